/*
 * The C API's conventions and its answers to bad input: NULL and
 * non-UTF-8 arguments, malformed JSON, QEMU's blockdev-add/-del errors,
 * invalid enum values and struct sizes, the errp rules (NULL allowed,
 * first error kept, per call and per thread), enum strings, event
 * handlers and the event queue's eventfd, and host nodes.
 */
#include <pthread.h>

#include "util.h"

static BjContext *ctx;
static char img[512];

#define GENERIC BJ_ERROR_CLASS_GENERIC_ERROR

/* ---- small helpers ---------------------------------------------------------- */

/* A failed call reported EINVAL with "Invalid argument: 'name' must not be
 * NULL"; frees the error. */
#define CHECK_NULL_ARG(err, name)                                          \
    do {                                                                   \
        CHECK((err) != NULL);                                              \
        CHECK_INT(bj_error_get_errno(err), EINVAL);                        \
        CHECK_ERR((err), GENERIC, "Invalid argument: '" name "' must not be NULL"); \
    } while (0)

/* The error's message starts with `prefix`; frees the error. */
#define CHECK_ERR_PREFIX(err, cls, prefix)                                 \
    do {                                                                   \
        if (!(err)) {                                                      \
            FAIL("expected error \"%s...\", got none", (prefix));          \
        }                                                                  \
        if (strncmp(bj_error_get_pretty(err), (prefix), strlen(prefix)) != 0) { \
            FAIL("error \"%s\" does not start with \"%s\"",                \
                 bj_error_get_pretty(err), (prefix));                      \
        }                                                                  \
        CHECK_INT(bj_error_get_class(err), (cls));                         \
        bj_error_free(&(err));                                             \
    } while (0)

static void add_ok(BjContext *c, const char *json)
{
    BjError *err = NULL;
    CHECK(bj_blockdev_add(c, json, &err));
    CHECK_NO_ERR(err);
}

static void add_fails(const char *json, const char *msg)
{
    BjError *err = NULL;
    CHECK(!bj_blockdev_add(ctx, json, &err));
    CHECK_ERR(err, GENERIC, msg);
}

static void del_ok(BjContext *c, const char *name)
{
    BjError *err = NULL;
    CHECK(bj_blockdev_del(c, name, &err));
    CHECK_NO_ERR(err);
}

static void del_fails(const char *name, const char *msg)
{
    BjError *err = NULL;
    CHECK(!bj_blockdev_del(ctx, name, &err));
    CHECK_ERR(err, GENERIC, msg);
}

static int load(const int *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static void bump(int *p)
{
    __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST);
}

/* A job on `node` (may be NULL) that stays `created`: cancel_sync ends it. */
static BjJob *idle_job(const char *id, const char *node, TestJob *s)
{
    BjJobDriver d = test_driver();
    BjError *err = NULL;
    BjJob *job;
    memset(s, 0, sizeof(*s));
    job = bj_block_job_create(ctx, id, &d, NULL, node, 0,
                              BJ_JOB_MANUAL_FINALIZE | BJ_JOB_MANUAL_DISMISS, s, &err);
    CHECK_NO_ERR(err);
    CHECK(job != NULL);
    return job;
}

static void end_job(BjJob **job, TestJob *s)
{
    CHECK_INT(bj_job_cancel_sync(*job, true), -ECANCELED);
    bj_job_unref(job);
    CHECK(*job == NULL);
    CHECK_INT(s->freed, 1);
}

/* Drop our reference to a job that reached null and wait for drv->free:
 * the job's own thread may hold the last reference a moment longer, so
 * free can run after bj_job_unref returned. `s` must stay valid until
 * then (it is on the caller's stack). */
static void unref_and_wait_free(BjJob **job, TestJob *s)
{
    int i;
    bj_job_unref(job);
    CHECK(*job == NULL);
    for (i = 0; i < 5000 && !load(&s->freed); i++) {
        sleep_ms(1);
    }
    CHECK_INT(load(&s->freed), 1);
}

/* ---- a minimal JSON syntax checker (RFC 8259 grammar) --------------------- */

static const char *js_value(const char *p, int depth);

static const char *js_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
        p++;
    }
    return p;
}

static const char *js_string(const char *p)
{
    if (*p++ != '"') {
        return NULL;
    }
    while (*p != '"') {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20) {
            return NULL; /* includes the terminating NUL */
        }
        if (c == '\\') {
            p++;
            if (*p == 'u') {
                int i;
                for (i = 1; i <= 4; i++) {
                    if (!strchr("0123456789abcdefABCDEF", p[i]) || !p[i]) {
                        return NULL;
                    }
                }
                p += 5;
                continue;
            }
            if (!*p || !strchr("\"\\/bfnrt", *p)) {
                return NULL;
            }
        }
        p++;
    }
    return p + 1;
}

static const char *js_number(const char *p)
{
    const char *start;
    if (*p == '-') {
        p++;
    }
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (*p >= '0' && *p <= '9') {
            p++;
        }
    } else {
        return NULL;
    }
    if (*p == '.') {
        start = ++p;
        while (*p >= '0' && *p <= '9') {
            p++;
        }
        if (p == start) {
            return NULL;
        }
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-') {
            p++;
        }
        start = p;
        while (*p >= '0' && *p <= '9') {
            p++;
        }
        if (p == start) {
            return NULL;
        }
    }
    return p;
}

static const char *js_value(const char *p, int depth)
{
    if (depth > 64) {
        return NULL;
    }
    p = js_ws(p);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        int object = *p == '{';
        p = js_ws(p + 1);
        if (*p == close) {
            return p + 1;
        }
        for (;;) {
            if (object) {
                p = js_string(js_ws(p));
                if (!p) {
                    return NULL;
                }
                p = js_ws(p);
                if (*p++ != ':') {
                    return NULL;
                }
            }
            p = js_value(p, depth + 1);
            if (!p) {
                return NULL;
            }
            p = js_ws(p);
            if (*p == close) {
                return p + 1;
            }
            if (*p++ != ',') {
                return NULL;
            }
        }
    }
    if (*p == '"') {
        return js_string(p);
    }
    if (strncmp(p, "true", 4) == 0) {
        return p + 4;
    }
    if (strncmp(p, "false", 5) == 0) {
        return p + 5;
    }
    if (strncmp(p, "null", 4) == 0) {
        return p + 4;
    }
    return js_number(p);
}

static int json_valid(const char *s)
{
    const char *end = s ? js_value(s, 0) : NULL;
    return end && *js_ws(end) == '\0';
}

/* ---- NULL arguments ------------------------------------------------------------ */

static void null_ctx(void)
{
    BjError *err = NULL;
    BjJobDriver d = test_driver();
    TestJob s;

    CHECK(!bj_blockdev_add(NULL, "{}", &err));
    CHECK_NULL_ARG(err, "ctx");
    CHECK(!bj_blockdev_del(NULL, "x", &err));
    CHECK_NULL_ARG(err, "ctx");
    CHECK(bj_node_find(NULL, "x", &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK(bj_blk_new(NULL, "x", NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK(bj_job_txn_new(NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK_INT(bj_event_queue_enable(NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK(bj_query_jobs(NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK(bj_query_block_jobs(NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK(!bj_event_flush(NULL, &err));
    CHECK_NULL_ARG(err, "ctx");
    CHECK(!bj_event_remove_handler(NULL, 1, &err));
    CHECK_NULL_ARG(err, "ctx");
    CHECK(!bj_drain_all_end(NULL, &err));
    CHECK_NULL_ARG(err, "ctx");

    /* Creation functions that own `opaque` release it when they fail. */
    memset(&s, 0, sizeof(s));
    CHECK(bj_block_job_create(NULL, "j", &d, NULL, NULL, 0, 0, &s, &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK_INT(s.freed, 1);
    memset(&s, 0, sizeof(s));
    CHECK(bj_job_create(NULL, "j", &d, NULL, 0, &s, &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK_INT(s.freed, 1);
}

static void null_strings(void)
{
    BjError *err = NULL;
    TestJob s;
    BjJobDriver d = test_driver();

    CHECK(!bj_blockdev_add(ctx, NULL, &err));
    CHECK_NULL_ARG(err, "json");
    CHECK(!bj_blockdev_del(ctx, NULL, &err));
    CHECK_NULL_ARG(err, "node_name");
    CHECK(bj_node_find(ctx, NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "name");
    CHECK(bj_blk_new(ctx, NULL, NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "node_name");
    /* A NULL job id is allowed; with no node there is no default id. */
    memset(&s, 0, sizeof(s));
    CHECK(bj_block_job_create(ctx, NULL, &d, NULL, NULL, 0, 0, &s, &err) == NULL);
    CHECK_ERR(err, GENERIC, "An explicit job ID is required");
    CHECK_INT(s.freed, 1);
    memset(&s, 0, sizeof(s));
    CHECK(bj_job_create(ctx, NULL, &d, NULL, 0, &s, &err) == NULL);
    CHECK_ERR(err, GENERIC, "An explicit job ID is required");
    CHECK_INT(s.freed, 1);
    /* bj_error_setg with a NULL message still creates an error. */
    bj_error_setg(&err, BJ_ERROR_CLASS_GENERIC_ERROR, 0, NULL);
    CHECK(err != NULL);
    bj_error_free(&err);
}

static void null_handles(void)
{
    BjError *err = NULL;
    BjNode *node;
    char buf[16];
    int32_t action = 99;

    CHECK(!bj_job_start(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_job_user_pause(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_job_user_resume(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_job_complete(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_job_finalize(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_job_dismiss(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_job_user_cancel(NULL, true, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_block_job_cancel(NULL, false, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_block_job_set_speed(NULL, 0, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK_INT(bj_job_complete_sync(NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "job");
    CHECK_INT(bj_job_finish_sync(NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_job_transition_to_ready(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK_INT(bj_block_job_error_action(NULL, BJ_BLOCKDEV_ON_ERROR_REPORT, true, EIO, &err), -1);
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_block_job_iostatus_reset(NULL, &err));
    CHECK_NULL_ARG(err, "job");
    CHECK(bj_block_job_query(NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "job");
    CHECK(bj_block_job_query_json(NULL, &err) == NULL);
    CHECK_NULL_ARG(err, "job");
    CHECK(!bj_block_job_add_bdrv(NULL, NULL, &err));
    CHECK_NULL_ARG(err, "job");

    /* Node I/O with a NULL node: -EINVAL. */
    CHECK_INT(bj_node_get_length(NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "node");
    CHECK_INT(bj_node_pread(NULL, 0, buf, 1, &err), -EINVAL);
    CHECK_NULL_ARG(err, "node");
    CHECK_INT(bj_node_pwrite(NULL, 0, buf, 1, &err), -EINVAL);
    CHECK_NULL_ARG(err, "node");
    CHECK_INT(bj_node_pwrite_zeroes(NULL, 0, 1, false, &err), -EINVAL);
    CHECK_NULL_ARG(err, "node");
    CHECK_INT(bj_node_pdiscard(NULL, 0, 1, &err), -EINVAL);
    CHECK_NULL_ARG(err, "node");
    CHECK_INT(bj_node_flush(NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "node");
    CHECK_INT(bj_node_block_status(NULL, 0, 1, NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "node");

    /* A NULL buffer for a non-empty request. */
    node = bj_node_find(ctx, "base", &err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_node_pread(node, 0, NULL, 1, &err), -EINVAL);
    CHECK_NULL_ARG(err, "buf");
    CHECK_INT(bj_node_pwrite(node, 0, NULL, 1, &err), -EINVAL);
    CHECK_NULL_ARG(err, "buf");
    CHECK_INT(bj_node_pread(node, 0, NULL, 0, &err), 0); /* nothing to read */
    CHECK_NO_ERR(err);
    bj_node_unref(&node);
    CHECK(node == NULL);

    /* Guest I/O with a NULL backend. */
    CHECK_INT(bj_blk_pread(NULL, 0, buf, 1, &action, &err), -EINVAL);
    CHECK_NULL_ARG(err, "blk");
    CHECK_INT(bj_blk_pwrite(NULL, 0, buf, 1, NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "blk");
    CHECK_INT(bj_blk_flush(NULL, NULL, &err), -EINVAL);
    CHECK_NULL_ARG(err, "blk");
    CHECK(bj_blk_getlength(NULL, &err) < 0);
    CHECK_NULL_ARG(err, "blk");
    CHECK(!bj_blk_drain_begin(NULL, &err));
    CHECK_NULL_ARG(err, "blk");
    CHECK(!bj_blk_drain_end(NULL, &err));
    CHECK_NULL_ARG(err, "blk");
}

static int64_t dummy_len(void *opaque)
{
    (void)opaque;
    return 4096;
}

static int32_t dummy_pread(void *opaque, int64_t offset, void *buf, int64_t bytes)
{
    (void)opaque;
    (void)offset;
    memset(buf, 0, (size_t)bytes);
    return 0;
}

static void count_free(void *opaque)
{
    bump(opaque);
}

static void null_tables(void)
{
    BjError *err = NULL;
    BjJobDriver d = test_driver();
    BjHostNodeOps ops;
    TestJob s;
    int freed = 0;

    /* NULL drv: nothing to call free through. */
    memset(&s, 0, sizeof(s));
    CHECK(bj_block_job_create(ctx, "j", NULL, NULL, NULL, 0, 0, &s, &err) == NULL);
    CHECK_NULL_ARG(err, "drv");
    CHECK(bj_job_create(ctx, "j", NULL, NULL, 0, &s, &err) == NULL);
    CHECK_NULL_ARG(err, "drv");
    CHECK_INT(s.freed, 0);
    /* A table without run: refused, free called. */
    d.run = NULL;
    CHECK(bj_block_job_create(ctx, "j", &d, NULL, NULL, 0, 0, &s, &err) == NULL);
    CHECK_NULL_ARG(err, "drv->run");
    CHECK_INT(s.freed, 1);

    /* NULL ops. */
    CHECK(bj_node_add_host(ctx, "h0", false, NULL, &freed, &err) == NULL);
    CHECK_NULL_ARG(err, "ops");
    CHECK_INT(freed, 0);
    /* Missing required callbacks: refused, free called before returning. */
    memset(&ops, 0, sizeof(ops));
    ops.size = sizeof(ops);
    ops.free = count_free;
    ops.pread = dummy_pread;
    CHECK(bj_node_add_host(ctx, "h0", true, &ops, &freed, &err) == NULL);
    CHECK_NULL_ARG(err, "ops->get_length");
    CHECK_INT(load(&freed), 1);
    ops.get_length = dummy_len;
    ops.pread = NULL;
    CHECK(bj_node_add_host(ctx, "h0", true, &ops, &freed, &err) == NULL);
    CHECK_NULL_ARG(err, "ops->pread");
    CHECK_INT(load(&freed), 2);
    ops.pread = dummy_pread;
    CHECK(bj_node_add_host(ctx, "h0", false, &ops, &freed, &err) == NULL);
    CHECK_NULL_ARG(err, "ops->pwrite");
    CHECK_INT(load(&freed), 3);
    /* ...and with everything a read-only node needs, NULL ctx / name. */
    CHECK(bj_node_add_host(NULL, "h0", true, &ops, &freed, &err) == NULL);
    CHECK_NULL_ARG(err, "ctx");
    CHECK_INT(load(&freed), 4);
    CHECK(bj_node_add_host(ctx, NULL, true, &ops, &freed, &err) == NULL);
    CHECK_NULL_ARG(err, "node_name");
    CHECK_INT(load(&freed), 5);
}

/* Functions without errp tolerate NULL and return their failure value. */
static void null_without_errp(void)
{
    BjJob *job = NULL;
    BjNode *node = NULL;
    BjContext *c = NULL;
    BjEvent *ev = NULL;
    BjBlockBackend *blk = NULL;
    BjBlockJobInfo *info = NULL;
    BjJobTxn *txn = NULL;
    BjError *err = NULL;

    CHECK_INT(bj_job_get_status(NULL), -1);
    CHECK(bj_job_get_id(NULL) == NULL);
    CHECK(bj_job_find(NULL, "x") == NULL);
    CHECK(bj_job_find(ctx, NULL) == NULL);
    CHECK(bj_job_ref(NULL) == NULL);
    CHECK(bj_job_cancel_sync(NULL, true) < 0);
    CHECK(!bj_job_wait_status(NULL, BJ_JOB_STATUS_NULL, 0));
    CHECK(!bj_job_is_ready(NULL));
    CHECK_INT(bj_block_job_get_iostatus(NULL), -1);
    bj_job_pause_point(NULL);
    bj_job_sleep_ns(NULL, 1000);
    bj_job_enter(NULL);
    bj_job_progress_update(NULL, 1);
    bj_job_progress_set_remaining(NULL, 1);
    bj_job_progress_increase_remaining(NULL, 1);
    bj_block_job_ratelimit_processed_bytes(NULL, 1);
    bj_block_job_ratelimit_sleep(NULL);
    (void)bj_job_is_cancelled(NULL);
    (void)bj_job_cancel_requested(NULL);
    bj_job_unref(NULL);
    bj_job_unref(&job);
    CHECK(bj_node_get_name(NULL) == NULL);
    bj_node_unref(NULL);
    bj_node_unref(&node);
    CHECK(bj_event_next(NULL) == NULL);
    bj_event_free(NULL);
    bj_event_free(&ev);
    CHECK_INT(bj_event_queue_get_fd(NULL), -1);
    bj_event_queue_ack(NULL);
    bj_event_queue_disable(NULL);
    bj_drain_all(NULL);
    bj_drain_all_begin(NULL);
    CHECK_INT(bj_blk_get_iostatus(NULL), -1);
    bj_blk_iostatus_reset(NULL);
    bj_blk_free(NULL);
    bj_blk_free(&blk);
    bj_block_job_info_free(NULL);
    bj_block_job_info_free(&info);
    bj_job_txn_unref(NULL);
    bj_job_txn_unref(&txn);
    bj_context_free(NULL);
    bj_context_free(&c);
    bj_free(NULL);
    bj_error_free(NULL);
    bj_error_free(&err);
    CHECK_STR(bj_error_get_pretty(NULL), "");
    CHECK_INT(bj_error_get_class(NULL), BJ_ERROR_CLASS_GENERIC_ERROR);
    CHECK_INT(bj_error_get_errno(NULL), 0);
    bj_error_setg(NULL, BJ_ERROR_CLASS_GENERIC_ERROR, EIO, "ignored");
    CHECK(bj_version() != NULL && bj_version()[0] != '\0');
}

/* ---- malformed input ----------------------------------------------------------- */

static void malformed_json(void)
{
    static const char *bad[] = {
        "{", "", "nope", "{\"driver\":\"raw\",}", "{\"driver\":\"raw\"} x", "{'driver':'raw'}",
    };
    size_t i;
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        BjError *err = NULL;
        CHECK(!bj_blockdev_add(ctx, bad[i], &err));
        CHECK_INT(bj_error_get_errno(err), 0);
        CHECK_ERR_PREFIX(err, GENERIC, "Invalid JSON:");
    }
}

static void invalid_utf8(void)
{
    BjError *err = NULL;
    TestJob s;
    BjJobDriver d = test_driver();
    BjBlockBackendOptions o;

    CHECK(bj_node_find(ctx, "\xff\xfe", &err) == NULL);
    CHECK_INT(bj_error_get_errno(err), EINVAL);
    CHECK_ERR(err, GENERIC, "Invalid argument: 'name' is not valid UTF-8");
    CHECK(!bj_blockdev_del(ctx, "\xff\xfe", &err));
    CHECK_ERR(err, GENERIC, "Invalid argument: 'node_name' is not valid UTF-8");
    CHECK(!bj_blockdev_add(ctx, "{\"driver\":\"\xc3\x28\"}", &err));
    CHECK_ERR(err, GENERIC, "Invalid argument: 'json' is not valid UTF-8");
    CHECK(bj_blk_new(ctx, "\xff", NULL, &err) == NULL);
    CHECK_ERR(err, GENERIC, "Invalid argument: 'node_name' is not valid UTF-8");
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.name = "dev\xe2\x82";
    CHECK(bj_blk_new(ctx, "base", &o, &err) == NULL);
    CHECK_ERR(err, GENERIC, "Invalid argument: 'opts->name' is not valid UTF-8");
    memset(&s, 0, sizeof(s));
    CHECK(bj_block_job_create(ctx, "j\xff", &d, NULL, NULL, 0, 0, &s, &err) == NULL);
    CHECK_ERR(err, GENERIC, "Invalid argument: 'job_id' is not valid UTF-8");
    CHECK_INT(s.freed, 1);
    memset(&s, 0, sizeof(s));
    CHECK(bj_block_job_create(ctx, "j", &d, NULL, "\xfe", 0, 0, &s, &err) == NULL);
    CHECK_ERR(err, GENERIC, "Invalid argument: 'node_name' is not valid UTF-8");
    CHECK_INT(s.freed, 1);
    CHECK(bj_job_find(ctx, "\xff") == NULL);
    /* Valid UTF-8 that is not a valid name is QEMU's error instead. */
    CHECK(bj_node_find(ctx, "n\xc3\xa9", &err) == NULL);
    CHECK_ERR(err, GENERIC,
              "Cannot find device='n\xc3\xa9' nor node-name='n\xc3\xa9'");
}

static void blockdev_add_errors(void)
{
    char json[1024];
    static const char name31[] = "abcdefghijklmnopqrstuvwxyz01234";
    static const char name32[] = "abcdefghijklmnopqrstuvwxyz012345";

    add_fails("{\"driver\":\"nope\",\"node-name\":\"n1\"}",
              "Parameter 'driver' does not accept value 'nope'");
    add_fails("{\"driver\":\"file\",\"node-name\":\"n1\"}", "Parameter 'filename' is missing");
    add_fails("{\"driver\":\"file\",\"node-name\":\"n1\",\"filename\":\"/nonexistent/x\"}",
              "Could not open '/nonexistent/x': No such file or directory");
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"dup\",\"filename\":\"%s\"}",
             img);
    add_ok(ctx, json);
    add_fails(json, "Duplicate nodes with node-name='dup'");
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"1abc\",\"filename\":\"%s\"}",
             img);
    add_fails(json, "Invalid node-name: '1abc'");
    CHECK(strlen(name32) == 32 && strlen(name31) == 31);
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"%s\",\"filename\":\"%s\"}",
             name32, img);
    add_fails(json, "Node name too long");
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"%s\",\"filename\":\"%s\"}",
             name31, img);
    add_ok(ctx, json);
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"filename\":\"%s\"}", img);
    add_fails(json, "'node-name' must be specified for the root node");
    add_fails("{\"driver\":\"raw\",\"node-name\":\"r\",\"file\":\"nosuch\"}",
              "Cannot find device='nosuch' nor node-name='nosuch'");
    /* Nothing of a failed add stays behind: the names are free. */
    add_fails("{\"driver\":\"raw\",\"node-name\":\"half\",\"file\":{\"driver\":\"file\","
              "\"node-name\":\"half-file\",\"filename\":\"/nonexistent/x\"}}",
              "Could not open '/nonexistent/x': No such file or directory");
    snprintf(json, sizeof(json), "{\"driver\":\"raw\",\"node-name\":\"half\",\"file\":{"
             "\"driver\":\"file\",\"node-name\":\"half-file\",\"filename\":\"%s\"}}", img);
    add_ok(ctx, json);
    del_ok(ctx, "half");
    del_ok(ctx, "dup");
    del_ok(ctx, name31);
}

/* GenericError, as QEMU's bdrv_lookup_bs (error_setg) reports it. */
static void node_find_unknown(void)
{
    BjError *err = NULL;
    BjNode *n;
    char *name;
    CHECK(bj_node_find(ctx, "x", &err) == NULL);
    CHECK_INT(bj_error_get_errno(err), 0);
    CHECK_ERR(err, GENERIC, "Cannot find device='x' nor node-name='x'");
    CHECK(bj_node_find(ctx, "", &err) == NULL);
    CHECK_ERR(err, GENERIC, "Cannot find device='' nor node-name=''");
    n = bj_node_find(ctx, "base", &err);
    CHECK_NO_ERR(err);
    name = bj_node_get_name(n);
    CHECK_STR(name, "base");
    bj_free(name);
    CHECK_INT(bj_node_get_length(n, &err), 1 << 20);
    CHECK_NO_ERR(err);
    bj_node_unref(&n);
}

/* The auto-generated name of an inline child: "#block" + digits. Not
 * exposed by the API, so find it by asking blockdev-del about every
 * candidate in a fresh context (few nodes, small counter). */
static int find_auto_name(BjContext *c, char *out, size_t n, char *msg, size_t msg_len)
{
    int counter, r;
    for (counter = 0; counter < 10; counter++) {
        for (r = 0; r < 100; r++) {
            BjError *err = NULL;
            snprintf(out, n, "#block%d%02d", counter, r);
            CHECK(!bj_blockdev_del(c, out, &err));
            CHECK(err != NULL);
            if (strncmp(bj_error_get_pretty(err), "Failed to find node", 19) != 0) {
                snprintf(msg, msg_len, "%s", bj_error_get_pretty(err));
                bj_error_free(&err);
                return 1;
            }
            bj_error_free(&err);
        }
    }
    return 0;
}

static void blockdev_del_rules(void)
{
    char json[1024], name[64], msg[256], expect[256];
    BjError *err = NULL;
    BjBlockBackend *blk;
    BjBlockBackendOptions o;
    BjContext *c2;
    BjJob *job;
    TestJob s;

    del_fails("x", "Failed to find node with node-name='x'");

    /* Used as a child by reference. */
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"f1\",\"filename\":\"%s\"}",
             img);
    add_ok(ctx, json);
    add_ok(ctx, "{\"driver\":\"raw\",\"node-name\":\"r1\",\"file\":\"f1\"}");
    del_fails("f1", "Block device f1 is in use");
    del_ok(ctx, "r1");
    del_ok(ctx, "f1");

    /* An inline child has an automatic name and is not the monitor's. */
    c2 = new_ctx();
    snprintf(json, sizeof(json), "{\"driver\":\"raw\",\"node-name\":\"r2\",\"file\":{"
             "\"driver\":\"file\",\"filename\":\"%s\"}}", img);
    add_ok(c2, json);
    CHECK(find_auto_name(c2, name, sizeof(name), msg, sizeof(msg)));
    snprintf(expect, sizeof(expect), "Node %s is not owned by the monitor", name);
    CHECK_STR(msg, expect);
    CHECK(strncmp(msg, "Node #block", 11) == 0);
    /* ...and is deleted with its parent. */
    del_ok(c2, "r2");
    CHECK(!bj_blockdev_del(c2, name, &err));
    snprintf(expect, sizeof(expect), "Failed to find node with node-name='%s'", name);
    CHECK_ERR(err, GENERIC, expect);
    /* A "#" name can never be chosen by the user. */
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"%s\",\"filename\":\"%s\"}",
             name, img);
    CHECK(!bj_blockdev_add(c2, json, &err));
    snprintf(expect, sizeof(expect), "Invalid node-name: '%s'", name);
    CHECK_ERR(err, GENERIC, expect);
    bj_context_free(&c2);
    CHECK(c2 == NULL);

    /* A guest backend is attached. */
    add_raw(ctx, "withblk", img, NULL, 0, 0);
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.name = "drive0";
    blk = bj_blk_new(ctx, "withblk", &o, &err);
    CHECK_NO_ERR(err);
    del_fails("withblk", "Node withblk is in use");
    bj_blk_free(&blk);
    CHECK(blk == NULL);
    del_ok(ctx, "withblk");

    /* A job's main node, and a node the job merely uses. */
    add_raw(ctx, "jobnode", img, NULL, 0, 0);
    add_raw(ctx, "usednode", img, NULL, 0, 0);
    job = idle_job("deljob", "jobnode", &s);
    del_fails("jobnode", "Node 'jobnode' is busy: block device is in use by block job: backup");
    {
        BjNode *n = bj_node_find(ctx, "usednode", &err);
        CHECK_NO_ERR(err);
        CHECK(bj_block_job_add_bdrv(job, n, &err));
        CHECK_NO_ERR(err);
        bj_node_unref(&n);
    }
    del_fails("usednode", "Node usednode is in use");
    end_job(&job, &s);
    del_ok(ctx, "jobnode");
    del_ok(ctx, "usednode");
}

static void invalid_enums(void)
{
    BjError *err = NULL;
    BjBlockBackendOptions o;
    BjJobDriver d = test_driver();
    TestJob s;
    BjJob *job;

    job = idle_job("enumjob", NULL, &s);
    CHECK_INT(bj_block_job_error_action(job, 99, true, EIO, &err), -1);
    CHECK_INT(bj_error_get_errno(err), EINVAL);
    CHECK_ERR(err, GENERIC, "Invalid argument: on_err 99 is not a BlockdevOnError");
    CHECK_INT(bj_block_job_error_action(job, -1, false, EIO, &err), -1);
    CHECK_ERR(err, GENERIC, "Invalid argument: on_err -1 is not a BlockdevOnError");
    CHECK_INT(bj_block_job_error_action(job, BJ_BLOCKDEV_ON_ERROR_REPORT, true, 0, &err), -1);
    CHECK_ERR(err, GENERIC, "Invalid argument: error must be a positive errno, got 0");
    CHECK(!bj_job_wait_status(job, 99, 0));
    CHECK(!bj_job_wait_status(job, -1, 0));
    end_job(&job, &s);

    memset(&s, 0, sizeof(s));
    d.job_type = 99;
    CHECK(bj_block_job_create(ctx, "j", &d, NULL, NULL, 0, 0, &s, &err) == NULL);
    CHECK_INT(bj_error_get_errno(err), EINVAL);
    CHECK_ERR(err, GENERIC, "Invalid argument: job_type 99 is not a JobType");
    CHECK_INT(s.freed, 1);
    d.job_type = BJ_JOB_TYPE_BACKUP;
    memset(&s, 0, sizeof(s));
    CHECK(bj_block_job_create(ctx, "j", &d, NULL, NULL, 0, 0x100, &s, &err) == NULL);
    CHECK_ERR(err, GENERIC, "Invalid job flags 0x100");
    CHECK_INT(s.freed, 1);

    add_raw(ctx, "enumnode", img, NULL, 0, 0);
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.rerror = 7;
    CHECK(bj_blk_new(ctx, "enumnode", &o, &err) == NULL);
    CHECK_INT(bj_error_get_errno(err), EINVAL);
    CHECK_ERR(err, GENERIC, "Invalid argument: rerror 7 is not a BlockdevOnError");
    o.rerror = BJ_BLOCKDEV_ON_ERROR_REPORT;
    o.werror = -3;
    CHECK(bj_blk_new(ctx, "enumnode", &o, &err) == NULL);
    CHECK_ERR(err, GENERIC, "Invalid argument: werror -3 is not a BlockdevOnError");
    del_ok(ctx, "enumnode");
}

static void wrong_struct_size(void)
{
    BjError *err = NULL;
    BjJobDriver d = test_driver();
    BjHostNodeOps ops;
    BjBlockBackendOptions o;
    TestJob s;
    char msg[256];
    int freed = 0;

    /* The table cannot be trusted: its free is not called. */
    memset(&s, 0, sizeof(s));
    d.size = 4;
    CHECK(bj_block_job_create(ctx, "j", &d, NULL, NULL, 0, 0, &s, &err) == NULL);
    CHECK_INT(bj_error_get_errno(err), EINVAL);
    snprintf(msg, sizeof(msg),
             "Invalid argument: drv->size is 4, expected sizeof(BjJobDriver) = %u",
             (unsigned)sizeof(BjJobDriver));
    CHECK_ERR(err, GENERIC, msg);
    CHECK(bj_job_create(ctx, "j", &d, NULL, 0, &s, &err) == NULL);
    CHECK_ERR(err, GENERIC, msg);
    CHECK_INT(s.freed, 0);

    memset(&ops, 0, sizeof(ops));
    ops.size = sizeof(ops) - 8;
    ops.get_length = dummy_len;
    ops.pread = dummy_pread;
    ops.free = count_free;
    CHECK(bj_node_add_host(ctx, "h1", true, &ops, &freed, &err) == NULL);
    snprintf(msg, sizeof(msg),
             "Invalid argument: ops->size is %u, expected sizeof(BjHostNodeOps) = %u",
             (unsigned)(sizeof(ops) - 8), (unsigned)sizeof(BjHostNodeOps));
    CHECK_ERR(err, GENERIC, msg);
    CHECK_INT(load(&freed), 0);

    memset(&o, 0, sizeof(o));
    CHECK(bj_blk_new(ctx, "base", &o, &err) == NULL);
    snprintf(msg, sizeof(msg),
             "Invalid argument: opts->size is 0, expected sizeof(BjBlockBackendOptions) = %u",
             (unsigned)sizeof(BjBlockBackendOptions));
    CHECK_ERR(err, GENERIC, msg);
    o.size = sizeof(o);
    o.reserved[7] = 1;
    CHECK(bj_blk_new(ctx, "base", &o, &err) == NULL);
    CHECK_ERR(err, GENERIC, "Invalid argument: opts->reserved must be zero");
}

static void job_find(void)
{
    TestJob s;
    BjJob *job, *found;
    char *id;
    CHECK(bj_job_find(ctx, "nosuch") == NULL);
    CHECK(bj_job_find(ctx, "") == NULL);
    job = idle_job("findme", NULL, &s);
    found = bj_job_find(ctx, "findme");
    CHECK(found != NULL);
    CHECK_INT(bj_job_get_status(found), BJ_JOB_STATUS_CREATED);
    id = bj_job_get_id(found);
    CHECK_STR(id, "findme");
    bj_free(id);
    bj_job_unref(&found);
    CHECK(found == NULL);
    CHECK(bj_job_find(ctx, "FINDME") == NULL); /* ids are case-sensitive */
    end_job(&job, &s);
    /* gone at null */
    CHECK(bj_job_find(ctx, "findme") == NULL);
}

/* ---- the errp conventions -------------------------------------------------------- */

static void errp_may_be_null(void)
{
    BjJobDriver d = test_driver();
    TestJob s;
    BjContext *c;
    char buf[8];

    CHECK(bj_node_find(ctx, "x", NULL) == NULL);
    CHECK(!bj_blockdev_add(ctx, "{", NULL));
    CHECK(!bj_blockdev_add(ctx, NULL, NULL));
    CHECK(!bj_blockdev_del(ctx, "x", NULL));
    CHECK(!bj_job_start(NULL, NULL));
    CHECK_INT(bj_job_complete_sync(NULL, NULL), -EINVAL);
    CHECK_INT(bj_job_finish_sync(NULL, NULL), -EINVAL);
    CHECK_INT(bj_node_pread(NULL, 0, buf, 1, NULL), -EINVAL);
    CHECK_INT(bj_event_queue_enable(NULL, NULL), -EINVAL);
    CHECK_INT(bj_block_job_error_action(NULL, 0, true, EIO, NULL), -1);
    CHECK(bj_job_txn_new(NULL, NULL) == NULL);
    CHECK_INT(bj_event_add_handler(ctx, NULL, NULL, NULL, NULL), 0);
    CHECK(!bj_event_remove_handler(ctx, 12345, NULL));
    memset(&s, 0, sizeof(s));
    CHECK(bj_block_job_create(ctx, "0bad", &d, NULL, NULL, 0, 0, &s, NULL) == NULL);
    CHECK_INT(s.freed, 1);
    {
        BjNode *n = bj_node_find(ctx, "base", NULL);
        CHECK(n != NULL);
        CHECK_INT(bj_node_pread(n, (1 << 20) - 4, buf, 8, NULL), -EIO);
        CHECK_INT(bj_node_pread(n, -1, buf, 8, NULL), -EINVAL);
        bj_node_unref(&n);
    }
    /* success with NULL errp works too */
    c = bj_context_new(NULL);
    CHECK(c != NULL);
    bj_context_free(&c);
}

static void first_error_kept(void)
{
    BjError *err = NULL;
    char json[1024];
    CHECK(bj_node_find(ctx, "first", &err) == NULL);
    CHECK(!bj_blockdev_del(ctx, "second", &err));
    CHECK_INT(bj_event_queue_enable(NULL, &err), -EINVAL);
    bj_error_setg(&err, GENERIC, EIO, "third");
    /* a call that succeeds leaves the error alone as well */
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"keep\",\"filename\":\"%s\"}",
             img);
    CHECK(bj_blockdev_add(ctx, json, &err));
    CHECK_INT(bj_error_get_errno(err), 0);
    CHECK_ERR(err, GENERIC,
              "Cannot find device='first' nor node-name='first'");
    del_ok(ctx, "keep");
}

typedef struct {
    pthread_barrier_t *barrier;
    int which;
    int failures;
} ThreadArg;

static void *error_thread(void *opaque)
{
    ThreadArg *a = opaque;
    char name[32], expect[128];
    int i;
    snprintf(name, sizeof(name), "thread%d", a->which);
    pthread_barrier_wait(a->barrier);
    for (i = 0; i < 300; i++) {
        BjError *err = NULL;
        if (a->which == 0) {
            snprintf(expect, sizeof(expect), "Cannot find device='%s' nor node-name='%s'",
                     name, name);
            if (bj_node_find(ctx, name, &err) != NULL || !err ||
                bj_error_get_class(err) != GENERIC) {
                a->failures++;
            }
        } else {
            snprintf(expect, sizeof(expect), "Failed to find node with node-name='%s'", name);
            if (bj_blockdev_del(ctx, name, &err) || !err ||
                bj_error_get_class(err) != GENERIC) {
                a->failures++;
            }
        }
        if (!err || strcmp(bj_error_get_pretty(err), expect) != 0) {
            a->failures++;
        }
        bj_error_free(&err);
        if (err) {
            a->failures++;
        }
    }
    return NULL;
}

static void errors_per_thread(void)
{
    pthread_barrier_t barrier;
    pthread_t t[2];
    ThreadArg a[2];
    int i;
    CHECK(pthread_barrier_init(&barrier, NULL, 2) == 0);
    for (i = 0; i < 2; i++) {
        a[i].barrier = &barrier;
        a[i].which = i;
        a[i].failures = 0;
        CHECK(pthread_create(&t[i], NULL, error_thread, &a[i]) == 0);
    }
    for (i = 0; i < 2; i++) {
        CHECK(pthread_join(t[i], NULL) == 0);
        CHECK_INT(a[i].failures, 0);
    }
    pthread_barrier_destroy(&barrier);
}

static void error_free_and_setg(void)
{
    BjError *err = NULL;
    bj_error_setg(&err, BJ_ERROR_CLASS_DEVICE_NOT_ACTIVE, ENOENT, "gone");
    CHECK(err != NULL);
    CHECK_INT(bj_error_get_errno(err), ENOENT);
    CHECK_ERR(err, BJ_ERROR_CLASS_DEVICE_NOT_ACTIVE, "gone");
    /* bad class: GenericError; errno <= 0: none */
    bj_error_setg(&err, 42, -5, "odd");
    CHECK_INT(bj_error_get_errno(err), 0);
    CHECK_ERR(err, GENERIC, "odd");
    bj_error_free(&err);
    CHECK(err == NULL);
    bj_error_free(NULL);
    CHECK(!bj_blockdev_del(ctx, "nothere", &err));
    CHECK(err != NULL);
    bj_error_free(&err);
    CHECK(err == NULL);
}

static void enum_strings(void)
{
    int i;
    CHECK(bj_job_status_str(99) == NULL);
    CHECK(bj_job_status_str(-1) == NULL);
    CHECK(bj_job_status_str(BJ_JOB_STATUS_NULL + 1) == NULL);
    CHECK_STR(bj_job_status_str(BJ_JOB_STATUS_UNDEFINED), "undefined");
    CHECK_STR(bj_job_status_str(BJ_JOB_STATUS_STANDBY), "standby");
    CHECK_STR(bj_job_status_str(BJ_JOB_STATUS_NULL), "null");
    for (i = BJ_JOB_STATUS_UNDEFINED; i <= BJ_JOB_STATUS_NULL; i++) {
        CHECK(bj_job_status_str(i) != NULL);
    }
    CHECK_STR(bj_job_verb_str(BJ_JOB_VERB_SET_SPEED), "set-speed");
    CHECK_STR(bj_job_verb_str(BJ_JOB_VERB_DISMISS), "dismiss");
    CHECK_STR(bj_job_verb_str(BJ_JOB_VERB_FINALIZE), "finalize");
    CHECK_STR(bj_job_verb_str(BJ_JOB_VERB_CHANGE), "change");
    CHECK(bj_job_verb_str(BJ_JOB_VERB_CHANGE + 1) == NULL);
    CHECK_STR(bj_error_class_str(BJ_ERROR_CLASS_DEVICE_NOT_ACTIVE), "DeviceNotActive");
    CHECK_STR(bj_error_class_str(BJ_ERROR_CLASS_GENERIC_ERROR), "GenericError");
    CHECK_STR(bj_error_class_str(BJ_ERROR_CLASS_DEVICE_NOT_FOUND), "DeviceNotFound");
    CHECK_STR(bj_error_class_str(BJ_ERROR_CLASS_KVM_MISSING_CAP), "KVMMissingCap");
    CHECK(bj_error_class_str(BJ_ERROR_CLASS_KVM_MISSING_CAP + 1) == NULL);
    CHECK_STR(bj_blockdev_on_error_str(BJ_BLOCKDEV_ON_ERROR_AUTO), "auto");
    CHECK_STR(bj_blockdev_on_error_str(BJ_BLOCKDEV_ON_ERROR_ENOSPC), "enospc");
    CHECK(bj_blockdev_on_error_str(5) == NULL);
    CHECK_STR(bj_block_error_action_str(BJ_BLOCK_ERROR_ACTION_IGNORE), "ignore");
    CHECK_STR(bj_block_error_action_str(BJ_BLOCK_ERROR_ACTION_STOP), "stop");
    CHECK(bj_block_error_action_str(3) == NULL);
    CHECK_STR(bj_block_device_io_status_str(BJ_BLOCK_DEVICE_IO_STATUS_NOSPACE), "nospace");
    CHECK(bj_block_device_io_status_str(3) == NULL);
    CHECK_STR(bj_io_operation_type_str(BJ_IO_OPERATION_TYPE_WRITE), "write");
    CHECK(bj_io_operation_type_str(2) == NULL);
    CHECK_STR(bj_job_type_str(BJ_JOB_TYPE_SNAPSHOT_DELETE), "snapshot-delete");
    CHECK_STR(bj_job_type_str(BJ_JOB_TYPE_BACKUP), "backup");
    CHECK(bj_job_type_str(BJ_JOB_TYPE_SNAPSHOT_DELETE + 1) == NULL);
    CHECK(bj_job_type_str(-1) == NULL);
}

/* ---- event handlers and the queue ------------------------------------------------ */

typedef struct {
    pthread_mutex_t lock;
    pthread_t main_thread;
    char seen[4096];      /* summaries, space-separated */
    uint64_t first_seq, last_seq;
    int count;
    int gaps;             /* seq not previous + 1 */
    int on_caller_thread; /* calls on the thread that registered */
    int destroyed;
    int flush_refused;    /* bj_event_flush inside the handler failed properly */
    int query_ok;         /* bj_query_jobs worked inside the handler */
    int reenter;          /* call back into the library from the handler */
} HState;

static void hstate_init(HState *h)
{
    memset(h, 0, sizeof(*h));
    CHECK(pthread_mutex_init(&h->lock, NULL) == 0);
    h->main_thread = pthread_self();
}

static void recorder(const BjEvent *ev, void *opaque)
{
    HState *h = opaque;
    char s[128];
    size_t len;
    summarize(ev, s, sizeof(s));
    pthread_mutex_lock(&h->lock);
    if (h->count == 0) {
        h->first_seq = ev->seq;
    } else if (ev->seq != h->last_seq + 1) {
        h->gaps++;
    }
    h->last_seq = ev->seq;
    h->count++;
    if (pthread_equal(pthread_self(), h->main_thread)) {
        h->on_caller_thread++;
    }
    len = strlen(h->seen);
    snprintf(h->seen + len, sizeof(h->seen) - len, "%s%s", len ? " " : "", s);
    if (h->reenter) {
        BjError *err = NULL;
        char *q;
        if (!bj_event_flush(ctx, &err) && err &&
            strcmp(bj_error_get_pretty(err),
                   "Cannot flush events from inside an event handler") == 0) {
            h->flush_refused++;
        }
        bj_error_free(&err);
        q = bj_query_jobs(ctx, &err);
        if (q && !err) {
            h->query_ok++;
        }
        bj_free(q);
        bj_error_free(&err);
    }
    pthread_mutex_unlock(&h->lock);
}

static void destroy_h(void *opaque)
{
    HState *h = opaque;
    bump(&h->destroyed);
}

/* Make a few events: a job that is created, runs and completes. */
static void make_events(const char *id)
{
    TestJob s;
    BjJobDriver d = test_driver();
    BjError *err = NULL;
    BjJob *job;
    memset(&s, 0, sizeof(s));
    job = bj_block_job_create(ctx, id, &d, NULL, NULL, 0, 0, &s, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_start(job, &err));
    CHECK_NO_ERR(err);
    __atomic_store_n(&s.should_complete, 1, __ATOMIC_SEQ_CST);
    CHECK_INT(bj_job_finish_sync(job, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_NULL, 5000));
    unref_and_wait_free(&job, &s);
}

static void event_handler_order(void)
{
    HState h;
    BjError *err = NULL;
    Trace t = { "", 0 };
    uint64_t id;
    bool ok;
    hstate_init(&h);
    discard_events(ctx);
    id = bj_event_add_handler(ctx, recorder, &h, destroy_h, &err);
    CHECK_NO_ERR(err);
    CHECK(id > 0);
    make_events("evjob");
    make_events("evjob2");
    CHECK(bj_event_flush(ctx, &err));
    CHECK_NO_ERR(err);
    /* the queue saw the same events */
    trace_drain(ctx, &t, 20);
    pthread_mutex_lock(&h.lock);
    CHECK_STR(h.seen, t.text);
    CHECK_STR(h.seen, "JSC:created JSC:running JSC:waiting JSC:pending COMPLETED "
                      "JSC:concluded JSC:null "
                      "JSC:created JSC:running JSC:waiting JSC:pending COMPLETED "
                      "JSC:concluded JSC:null");
    CHECK_INT(h.count, 14);
    CHECK_INT(h.gaps, 0);
    CHECK_INT(h.last_seq - h.first_seq, 13);
    CHECK_INT(h.on_caller_thread, 0);
    pthread_mutex_unlock(&h.lock);
    ok = bj_event_remove_handler(ctx, id, &err);
    CHECK_NO_ERR(err);
    CHECK(ok);
    CHECK_INT(load(&h.destroyed), 1);
    pthread_mutex_destroy(&h.lock);
}

static void event_handler_reentrant(void)
{
    HState h;
    BjError *err = NULL;
    uint64_t id;
    hstate_init(&h);
    h.reenter = 1;
    discard_events(ctx);
    id = bj_event_add_handler(ctx, recorder, &h, destroy_h, &err);
    CHECK_NO_ERR(err);
    make_events("reenter");
    CHECK(bj_event_flush(ctx, &err));
    CHECK_NO_ERR(err);
    pthread_mutex_lock(&h.lock);
    CHECK_INT(h.count, 7);
    CHECK_INT(h.flush_refused, 7);
    CHECK_INT(h.query_ok, 7);
    pthread_mutex_unlock(&h.lock);
    CHECK(bj_event_remove_handler(ctx, id, &err));
    CHECK_INT(load(&h.destroyed), 1);
    discard_events(ctx);
    pthread_mutex_destroy(&h.lock);
}

static void event_handler_remove(void)
{
    HState h;
    BjError *err = NULL;
    uint64_t id;
    int count;
    bool ok;
    hstate_init(&h);
    discard_events(ctx);
    id = bj_event_add_handler(ctx, recorder, &h, destroy_h, &err);
    CHECK_NO_ERR(err);
    make_events("rm1");
    ok = bj_event_remove_handler(ctx, id, &err);
    CHECK_NO_ERR(err);
    CHECK(ok);
    /* destroy ran exactly once, and the handler is not running */
    CHECK_INT(load(&h.destroyed), 1);
    pthread_mutex_lock(&h.lock);
    count = h.count;
    pthread_mutex_unlock(&h.lock);
    make_events("rm2");
    CHECK(bj_event_flush(ctx, &err));
    CHECK_NO_ERR(err);
    pthread_mutex_lock(&h.lock);
    CHECK_INT(h.count, count); /* nothing after removal */
    pthread_mutex_unlock(&h.lock);
    /* removing again, 0, or an id never handed out */
    CHECK(!bj_event_remove_handler(ctx, id, &err));
    {
        char msg[64];
        snprintf(msg, sizeof(msg), "No event handler with id %llu", (unsigned long long)id);
        CHECK_ERR(err, GENERIC, msg);
    }
    CHECK(!bj_event_remove_handler(ctx, 0, &err));
    CHECK_ERR(err, GENERIC, "No event handler with id 0");
    CHECK(!bj_event_remove_handler(ctx, 12345, &err));
    CHECK_ERR(err, GENERIC, "No event handler with id 12345");
    CHECK_INT(load(&h.destroyed), 1);
    discard_events(ctx);
    pthread_mutex_destroy(&h.lock);
}

static void slow_handler(const BjEvent *ev, void *opaque)
{
    (void)ev;
    bump(opaque);
    sleep_ms(20);
}

/* A handler added while the event thread still works through a backlog
 * gets only the events emitted after bj_event_add_handler ("every event
 * from now on"), even those the event thread has not delivered yet. */
static void event_handler_from_now_on(void)
{
    HState h;
    BjError *err = NULL;
    BjEvent *ev;
    TestJob s;
    BjJob *job;
    uint64_t id1, id2, last = 0;
    int slow_calls = 0;
    hstate_init(&h);
    discard_events(ctx);
    id1 = bj_event_add_handler(ctx, slow_handler, &slow_calls, NULL, &err);
    CHECK_NO_ERR(err);
    job = idle_job("nowon", NULL, &s);
    end_job(&job, &s); /* created aborting concluded null, quickly */
    while ((ev = next_event(ctx, 20))) {
        last = ev->seq;
        bj_event_free(&ev);
    }
    CHECK(last > 0);
    id2 = bj_event_add_handler(ctx, recorder, &h, destroy_h, &err);
    CHECK_NO_ERR(err);
    job = idle_job("nowon2", NULL, &s);
    end_job(&job, &s);
    CHECK(bj_event_flush(ctx, &err));
    CHECK_NO_ERR(err);
    pthread_mutex_lock(&h.lock);
    CHECK_INT(h.first_seq, last + 1);
    CHECK_INT(h.count, 4);
    CHECK_STR(h.seen, "JSC:created JSC:aborting JSC:concluded JSC:null");
    pthread_mutex_unlock(&h.lock);
    CHECK(bj_event_remove_handler(ctx, id2, &err));
    CHECK(bj_event_remove_handler(ctx, id1, &err));
    CHECK_NO_ERR(err);
    CHECK_INT(load(&slow_calls), 8);
    discard_events(ctx);
    pthread_mutex_destroy(&h.lock);
}

static void event_handler_bad_add(void)
{
    HState h;
    BjError *err = NULL;
    hstate_init(&h);
    /* NULL fn: refused, destroy called at once */
    CHECK_INT(bj_event_add_handler(ctx, NULL, &h, destroy_h, &err), 0);
    CHECK_NULL_ARG(err, "fn");
    CHECK_INT(load(&h.destroyed), 1);
    /* NULL ctx: the same */
    CHECK_INT(bj_event_add_handler(NULL, recorder, &h, destroy_h, &err), 0);
    CHECK_NULL_ARG(err, "ctx");
    CHECK_INT(load(&h.destroyed), 2);
    /* NULL destroy is allowed */
    CHECK_INT(bj_event_add_handler(ctx, NULL, &h, NULL, &err), 0);
    CHECK_NULL_ARG(err, "fn");
    CHECK_INT(load(&h.destroyed), 2);
    CHECK_INT(h.count, 0);
    pthread_mutex_destroy(&h.lock);
}

static void event_handler_destroy_at_free(void)
{
    HState h1, h2;
    BjError *err = NULL;
    BjContext *c = bj_context_new(&err);
    BjJobDriver d = test_driver();
    TestJob s;
    BjJob *job;
    CHECK_NO_ERR(err);
    hstate_init(&h1);
    hstate_init(&h2);
    CHECK(bj_event_add_handler(c, recorder, &h1, destroy_h, &err) > 0);
    CHECK(bj_event_add_handler(c, recorder, &h2, destroy_h, &err) > 0);
    CHECK_NO_ERR(err);
    /* a job still running when the context goes: cancelled, and its
     * events still reach the handlers before they are destroyed */
    memset(&s, 0, sizeof(s));
    job = bj_block_job_create(c, "atfree", &d, NULL, NULL, 0, 0, &s, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_start(job, &err));
    bj_job_unref(&job);
    bj_context_free(&c);
    CHECK(c == NULL);
    CHECK_INT(load(&h1.destroyed), 1);
    CHECK_INT(load(&h2.destroyed), 1);
    CHECK_INT(s.freed, 1);
    CHECK_STR(s.calls, "abort clean");
    CHECK_STR(h1.seen, "JSC:created JSC:running JSC:aborting CANCELLED JSC:concluded JSC:null");
    CHECK_STR(h2.seen, h1.seen);
    pthread_mutex_destroy(&h1.lock);
    pthread_mutex_destroy(&h2.lock);
}

static int readable(int fd, int timeout_ms)
{
    struct pollfd p;
    int r;
    p.fd = fd;
    p.events = POLLIN;
    p.revents = 0;
    r = poll(&p, 1, timeout_ms);
    CHECK(r >= 0);
    return r == 1 && (p.revents & POLLIN);
}

static void event_queue_eventfd(void)
{
    BjError *err = NULL;
    BjContext *saved = ctx;
    BjEvent *ev;
    TestJob s;
    BjJob *job;
    int fd, fd2;

    ctx = bj_context_new(&err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_event_queue_get_fd(ctx), -1);
    CHECK(bj_event_next(ctx) == NULL);
    fd = bj_event_queue_enable(ctx, &err);
    CHECK_NO_ERR(err);
    CHECK(fd >= 0);
    CHECK_INT(bj_event_queue_enable(ctx, &err), fd); /* same fd again */
    CHECK_INT(bj_event_queue_get_fd(ctx), fd);
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    CHECK(fcntl(fd, F_GETFL) & O_NONBLOCK);
    CHECK(!readable(fd, 0));

    job = idle_job("fdjob", NULL, &s); /* emits JSC:created */
    CHECK(readable(fd, 1000));
    bj_event_queue_ack(ctx);
    CHECK(!readable(fd, 0));   /* acked, though the event is still queued */
    ev = bj_event_next(ctx);
    CHECK(ev != NULL);
    CHECK_INT(ev->kind, BJ_EVENT_JOB_STATUS_CHANGE);
    CHECK_STR(ev->id, "fdjob");
    CHECK_INT(ev->status, BJ_JOB_STATUS_CREATED);
    CHECK_INT(ev->seq, 1);
    bj_event_free(&ev);
    CHECK(ev == NULL);
    CHECK(bj_event_next(ctx) == NULL);

    end_job(&job, &s); /* aborting, concluded, null */
    CHECK(readable(fd, 1000));
    bj_event_queue_ack(ctx);
    {
        Trace t = { "", 0 };
        trace_drain(ctx, &t, 0);
        CHECK_STR(t.text, "JSC:aborting JSC:concluded JSC:null");
    }

    /* disabled: no fd, nothing queued */
    bj_event_queue_disable(ctx);
    CHECK_INT(bj_event_queue_get_fd(ctx), -1);
    job = idle_job("fdjob2", NULL, &s);
    CHECK(bj_event_next(ctx) == NULL);
    fd2 = bj_event_queue_enable(ctx, &err);
    CHECK_NO_ERR(err);
    CHECK(fd2 >= 0);
    CHECK(bj_event_next(ctx) == NULL); /* only events from now on */
    end_job(&job, &s);
    ev = next_event(ctx, 1000);
    CHECK(ev != NULL);
    CHECK_INT(ev->status, BJ_JOB_STATUS_ABORTING);
    CHECK_INT(ev->seq, 6); /* seq counts every event of the context */
    bj_event_free(&ev);
    bj_context_free(&ctx);
    ctx = saved;
}

static void event_json(void)
{
    BjEvent *ev;
    BjError *err = NULL;
    TestJob s;
    BjJob *job;
    int n = 0, kinds = 0;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    s.should_converge = 1;
    {
        BjJobDriver d = test_driver();
        job = bj_block_job_create(ctx, "jsonjob", &d, NULL, NULL, 0, 0, &s, &err);
    }
    CHECK_NO_ERR(err);
    CHECK(bj_job_start(job, &err));
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    CHECK_INT(bj_block_job_error_action(job, BJ_BLOCKDEV_ON_ERROR_IGNORE, false, ENOSPC, &err),
              BJ_BLOCK_ERROR_ACTION_IGNORE);
    CHECK_INT(bj_job_complete_sync(job, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_NULL, 5000));
    unref_and_wait_free(&job, &s);
    while ((ev = next_event(ctx, 50))) {
        char want[128];
        CHECK(ev->json != NULL);
        if (!json_valid(ev->json)) {
            FAIL("not valid JSON: %s", ev->json);
        }
        snprintf(want, sizeof(want), "\"event\":\"%s\"", ev->name);
        CHECK(strstr(ev->json, want) != NULL);
        CHECK(strstr(ev->json, "\"timestamp\"") != NULL);
        CHECK(strstr(ev->json, "\"seconds\"") != NULL);
        CHECK(strstr(ev->json, "\"microseconds\"") != NULL);
        CHECK(strstr(ev->json, "\"data\"") != NULL);
        CHECK(ev->timestamp_seconds > 1500000000);
        CHECK(ev->timestamp_microseconds >= 0 && ev->timestamp_microseconds < 1000000);
        switch (ev->kind) {
        case BJ_EVENT_JOB_STATUS_CHANGE:
            CHECK(strstr(ev->json, "\"event\":\"JOB_STATUS_CHANGE\"") != NULL);
            CHECK(strstr(ev->json, "\"id\":\"jsonjob\"") != NULL);
            snprintf(want, sizeof(want), "\"status\":\"%s\"", bj_job_status_str(ev->status));
            CHECK(strstr(ev->json, want) != NULL);
            kinds |= 1;
            break;
        case BJ_EVENT_BLOCK_JOB_ERROR:
            CHECK_STR(ev->name, "BLOCK_JOB_ERROR");
            CHECK_STR(ev->device, "jsonjob");
            CHECK(strstr(ev->json, "\"operation\":\"write\"") != NULL);
            CHECK(strstr(ev->json, "\"action\":\"ignore\"") != NULL);
            kinds |= 2;
            break;
        case BJ_EVENT_BLOCK_JOB_READY:
            CHECK(strstr(ev->json, "\"type\":\"backup\"") != NULL);
            CHECK(strstr(ev->json, "\"len\":100") != NULL);
            CHECK(strstr(ev->json, "\"offset\":100") != NULL);
            kinds |= 4;
            break;
        case BJ_EVENT_BLOCK_JOB_COMPLETED:
            CHECK(strstr(ev->json, "\"device\":\"jsonjob\"") != NULL);
            CHECK(strstr(ev->json, "\"speed\":0") != NULL);
            CHECK(strstr(ev->json, "\"error\"") == NULL);
            CHECK(ev->error == NULL);
            kinds |= 8;
            break;
        default:
            FAIL("unexpected event %s", ev->name);
        }
        n++;
        bj_event_free(&ev);
    }
    CHECK_INT(kinds, 15);
    CHECK_INT(n, 10); /* created running ready READY ERR waiting pending
                         COMPLETED concluded null */
    CHECK(json_valid("{\"a\":[1,-2.5e3,true,null,\"x\\u00e9\"]}"));
    CHECK(!json_valid("{\"a\":}"));
    CHECK(!json_valid("{\"a\":1} x"));
}

/* ---- host nodes ------------------------------------------------------------------- */

typedef struct {
    unsigned char data[65536];
    int64_t len;
    int fail_read, fail_write, fail_flush, fail_len; /* errno to return, or 0 */
    int freed;
} Mem;

static int64_t mem_len(void *opaque)
{
    Mem *m = opaque;
    return m->fail_len ? -m->fail_len : m->len;
}

static int32_t mem_pread(void *opaque, int64_t offset, void *buf, int64_t bytes)
{
    Mem *m = opaque;
    if (m->fail_read) {
        return -m->fail_read;
    }
    if (offset < 0 || bytes < 0 || offset + bytes > m->len) {
        return -ERANGE; /* the library must never ask for this */
    }
    memcpy(buf, m->data + offset, (size_t)bytes);
    return 0;
}

static int32_t mem_pwrite(void *opaque, int64_t offset, const void *buf, int64_t bytes)
{
    Mem *m = opaque;
    if (m->fail_write) {
        return -m->fail_write;
    }
    if (offset < 0 || bytes < 0 || offset + bytes > m->len) {
        return -ERANGE;
    }
    memcpy(m->data + offset, buf, (size_t)bytes);
    return 0;
}

static int32_t mem_flush(void *opaque)
{
    Mem *m = opaque;
    return m->fail_flush ? -m->fail_flush : 0;
}

static void mem_free(void *opaque)
{
    Mem *m = opaque;
    bump(&m->freed);
}

static BjHostNodeOps mem_ops(void)
{
    BjHostNodeOps ops;
    memset(&ops, 0, sizeof(ops));
    ops.size = sizeof(ops);
    ops.get_length = mem_len;
    ops.pread = mem_pread;
    ops.pwrite = mem_pwrite;
    ops.flush = mem_flush;
    ops.free = mem_free;
    return ops;
}

static Mem *mem_new(int64_t len)
{
    Mem *m = calloc(1, sizeof(*m));
    CHECK(m);
    CHECK(len <= (int64_t)sizeof(m->data));
    m->len = len;
    return m;
}

static void host_node_io(void)
{
    BjError *err = NULL;
    BjContext *c = new_ctx();
    BjHostNodeOps ops = mem_ops();
    Mem *m = mem_new(8192);
    BjNode *h, *r;
    char buf[64];
    int64_t pnum = 0;

    h = bj_node_add_host(c, "hostnode", false, &ops, m, &err);
    CHECK_NO_ERR(err);
    CHECK(h != NULL);
    CHECK_INT(bj_node_get_length(h, &err), 8192);
    CHECK_INT(bj_node_pwrite(h, 4096, "hello", 5, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(memcmp(m->data + 4096, "hello", 5) == 0);
    memset(buf, 0, sizeof(buf));
    CHECK_INT(bj_node_pread(h, 4096, buf, 5, &err), 0);
    CHECK_STR(buf, "hello");
    CHECK_INT(bj_node_flush(h, &err), 0);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_node_block_status(h, 0, 8192, &pnum, &err), BJ_BLOCK_DATA | BJ_BLOCK_ALLOCATED);
    CHECK_INT(pnum, 8192);
    /* write-zeroes without the op: zero buffers are written */
    memset(m->data, 0xaa, 512);
    CHECK_INT(bj_node_pwrite_zeroes(h, 0, 256, false, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(m->data[0] == 0 && m->data[255] == 0 && m->data[256] == 0xaa);

    /* a raw node stacked on the host node */
    add_ok(c, "{\"driver\":\"raw\",\"node-name\":\"r\",\"file\":\"hostnode\"}");
    r = bj_node_find(c, "r", &err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_node_get_length(r, &err), 8192);
    memset(buf, 0, sizeof(buf));
    CHECK_INT(bj_node_pread(r, 4096, buf, 5, &err), 0);
    CHECK_STR(buf, "hello");
    CHECK_INT(bj_node_pwrite(r, 100, "world", 5, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(memcmp(m->data + 100, "world", 5) == 0);

    /* the host node is in use by r */
    CHECK(!bj_blockdev_del(c, "hostnode", &err));
    CHECK_ERR(err, GENERIC, "Block device hostnode is in use");

    /* a second host node with a taken name: refused, its free runs now */
    {
        Mem *m2 = mem_new(512);
        CHECK(bj_node_add_host(c, "hostnode", false, &ops, m2, &err) == NULL);
        CHECK_ERR(err, GENERIC, "Duplicate nodes with node-name='hostnode'");
        CHECK_INT(load(&m2->freed), 1);
        free(m2);
        m2 = mem_new(512);
        CHECK(bj_node_add_host(c, "1bad", false, &ops, m2, &err) == NULL);
        CHECK_ERR(err, GENERIC, "Invalid node-name: '1bad'");
        CHECK_INT(load(&m2->freed), 1);
        free(m2);
    }

    bj_node_unref(&r);
    bj_node_unref(&h);
    CHECK_INT(load(&m->freed), 0);
    bj_context_free(&c);
    CHECK_INT(load(&m->freed), 1); /* exactly once, when the context went */
    free(m);
}

static void host_node_errors(void)
{
    BjError *err = NULL;
    BjContext *c = new_ctx();
    BjHostNodeOps ops = mem_ops();
    Mem *m = mem_new(4096), *ro = mem_new(4096);
    BjNode *h, *r, *hro;
    char buf[512];

    h = bj_node_add_host(c, "hostnode", false, &ops, m, &err);
    CHECK_NO_ERR(err);
    add_ok(c, "{\"driver\":\"raw\",\"node-name\":\"r\",\"file\":\"hostnode\"}");
    r = bj_node_find(c, "r", &err);
    CHECK_NO_ERR(err);

    m->fail_read = EIO;
    CHECK_INT(bj_node_pread(h, 0, buf, 512, &err), -EIO);
    CHECK_INT(bj_error_get_errno(err), EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    CHECK_INT(bj_node_pread(r, 0, buf, 512, &err), -EIO);
    CHECK_INT(bj_error_get_errno(err), EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    m->fail_read = 0;

    m->fail_write = ENOSPC;
    CHECK_INT(bj_node_pwrite(r, 0, buf, 512, &err), -ENOSPC);
    CHECK_INT(bj_error_get_errno(err), ENOSPC);
    CHECK_ERR(err, GENERIC, "No space left on device");
    m->fail_write = 0;

    /* a flush after a write reaches the host and fails there */
    CHECK_INT(bj_node_pwrite(h, 0, buf, 512, &err), 0);
    m->fail_flush = EIO;
    CHECK_INT(bj_node_flush(h, &err), -EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    m->fail_flush = 0;

    /* a nonsensical positive "error" still fails... as -EIO */
    m->fail_len = EIO;
    CHECK_INT(bj_node_get_length(h, &err), -EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    CHECK_INT(bj_node_pread(h, 0, buf, 512, &err), -EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    m->fail_len = 0;

    /* read-only host node: writes are refused without calling the host */
    hro = bj_node_add_host(c, "ro", true, &ops, ro, &err);
    CHECK_NO_ERR(err);
    ro->fail_write = EIO;
    CHECK_INT(bj_node_pwrite(hro, 0, buf, 512, &err), -EPERM);
    CHECK_ERR(err, GENERIC, "Operation not permitted");
    CHECK_INT(bj_node_pread(hro, 0, buf, 512, &err), 0);
    CHECK_NO_ERR(err);

    bj_node_unref(&hro);
    bj_node_unref(&r);
    bj_node_unref(&h);
    bj_context_free(&c);
    CHECK_INT(load(&m->freed), 1);
    CHECK_INT(load(&ro->freed), 1);
    free(m);
    free(ro);
}

static void read_past_end(void)
{
    BjError *err = NULL;
    BjContext *c = new_ctx();
    BjHostNodeOps ops = mem_ops();
    Mem *m = mem_new(4096);
    BjNode *h, *base;
    char buf[1024];

    h = bj_node_add_host(c, "hostnode", false, &ops, m, &err);
    CHECK_NO_ERR(err);
    /* the host callback is never asked for a range beyond the end */
    CHECK_INT(bj_node_pread(h, 4096 - 512, buf, 1024, &err), -EIO);
    CHECK_INT(bj_error_get_errno(err), EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    CHECK_INT(bj_node_pread(h, 4096, buf, 1, &err), -EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    CHECK_INT(bj_node_pwrite(h, 4000, buf, 1024, &err), -EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    CHECK_INT(bj_node_pread(h, INT64_MAX, buf, 1024, &err), -EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    /* exactly up to the end is fine */
    CHECK_INT(bj_node_pread(h, 4096 - 1024, buf, 1024, &err), 0);
    CHECK_NO_ERR(err);
    /* negative offsets or lengths are bad arguments */
    CHECK_INT(bj_node_pread(h, -1, buf, 1, &err), -EINVAL);
    CHECK_ERR(err, GENERIC, "Invalid argument: negative offset or length");
    CHECK_INT(bj_node_pread(h, 0, buf, -1, &err), -EINVAL);
    CHECK_ERR(err, GENERIC, "Invalid argument: negative offset or length");
    bj_node_unref(&h);
    bj_context_free(&c);
    CHECK_INT(load(&m->freed), 1);
    free(m);

    /* the same on a file node of the shared context */
    base = bj_node_find(ctx, "base", &err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_node_pread(base, (1 << 20) - 100, buf, 1024, &err), -EIO);
    CHECK_ERR(err, GENERIC, "Input/output error");
    bj_node_unref(&base);
}

int main(void)
{
    ctx = new_ctx();
    make_image(img, sizeof(img), "capi.img", 1 << 20, 0);
    add_raw(ctx, "base", img, NULL, 0, 0);
    RUN(null_ctx);
    RUN(null_strings);
    RUN(null_handles);
    RUN(null_tables);
    RUN(null_without_errp);
    RUN(malformed_json);
    RUN(invalid_utf8);
    RUN(blockdev_add_errors);
    RUN(node_find_unknown);
    RUN(blockdev_del_rules);
    RUN(invalid_enums);
    RUN(wrong_struct_size);
    RUN(job_find);
    RUN(errp_may_be_null);
    RUN(first_error_kept);
    RUN(errors_per_thread);
    RUN(error_free_and_setg);
    RUN(enum_strings);
    RUN(event_handler_order);
    RUN(event_handler_reentrant);
    RUN(event_handler_remove);
    RUN(event_handler_from_now_on);
    RUN(event_handler_bad_add);
    RUN(event_handler_destroy_at_free);
    RUN(event_queue_eventfd);
    RUN(event_json);
    RUN(host_node_io);
    RUN(host_node_errors);
    RUN(read_past_end);
    bj_context_free(&ctx);
    CHECK(ctx == NULL);
    return 0;
}
