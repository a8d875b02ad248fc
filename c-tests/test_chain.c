/*
 * Stream and commit through the C ABI on qcow2 chains made by qemu-img:
 * the event sequences QEMU gives (recorded with qemu-storage-daemon 10),
 * the chain left on disk (qemu-img info), and bad input with QEMU's text.
 */
#include "util.h"

static char base_path[1024], mid_path[1024], top_path[1024];

static void sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(cmd, sizeof(cmd), fmt, ap) >= (int)sizeof(cmd)) {
        FAIL("command too long");
    }
    va_end(ap);
    if (system(cmd) != 0) {
        FAIL("failed: %s", cmd);
    }
}

/* base (4 MiB of 1) <- mid (2 at 1 MiB) <- top (3 at 3 MiB), by QEMU. */
static void make_chain(void)
{
    snprintf(base_path, sizeof(base_path), "%s/chain-base.qcow2", tmpdir());
    snprintf(mid_path, sizeof(mid_path), "%s/chain-mid.qcow2", tmpdir());
    snprintf(top_path, sizeof(top_path), "%s/chain-top.qcow2", tmpdir());
    sh("qemu-img create -q -f qcow2 %s 4M && qemu-io -c 'write -P 1 0 4M' %s >/dev/null",
       base_path, base_path);
    sh("qemu-img create -q -f qcow2 -b %s -F qcow2 %s && qemu-io -c 'write -P 2 1M 1M' %s >/dev/null",
       base_path, mid_path, mid_path);
    sh("qemu-img create -q -f qcow2 -b %s -F qcow2 %s && qemu-io -c 'write -P 3 3M 512k' %s >/dev/null",
       mid_path, top_path, top_path);
}

/* How many images `qemu-img info --backing-chain` lists for top. */
static int chain_length(void)
{
    char cmd[2048];
    char line[4096];
    int n = 0;
    FILE *p;
    snprintf(cmd, sizeof(cmd), "qemu-img info -U --backing-chain %s", top_path);
    p = popen(cmd, "r");
    CHECK(p);
    while (fgets(line, sizeof(line), p)) {
        if (strncmp(line, "image:", 6) == 0) {
            n++;
        }
    }
    CHECK(pclose(p) == 0);
    return n;
}

/* top with its chain opened from the headers; mid's file may fail reads. */
static BjContext *setup(const char *mid_event, int err_no)
{
    BjContext *ctx = new_ctx();
    BjError *err = NULL;
    char json[4096];
    make_chain();
    if (mid_event) {
        snprintf(json, sizeof(json),
                 "{\"driver\":\"qcow2\",\"node-name\":\"top\",\"file\":{\"driver\":\"file\","
                 "\"filename\":\"%s\"},\"backing\":{\"driver\":\"qcow2\",\"node-name\":\"mid\","
                 "\"file\":{\"driver\":\"blkdebug\",\"image\":{\"driver\":\"file\",\"filename\":\"%s\"},"
                 "\"inject-error\":[{\"event\":\"%s\",\"errno\":%d,\"once\":true}]}}}",
                 top_path, mid_path, mid_event, err_no);
    } else {
        snprintf(json, sizeof(json),
                 "{\"driver\":\"qcow2\",\"node-name\":\"top\",\"file\":{\"driver\":\"file\","
                 "\"filename\":\"%s\"}}",
                 top_path);
    }
    CHECK(bj_blockdev_add(ctx, json, &err));
    CHECK_NO_ERR(err);
    return ctx;
}

static BjStreamOptions stream_defaults(void)
{
    BjStreamOptions o;
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.job_id = "job0";
    o.device = "top";
    return o;
}

static BjCommitOptions commit_defaults(void)
{
    BjCommitOptions o;
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.job_id = "job0";
    o.device = "top";
    return o;
}

static void stream_flattens(void)
{
    BjContext *ctx = setup(NULL, 0);
    BjStreamOptions o = stream_defaults();
    BjError *err = NULL;
    Trace t = {0};
    BjJob *job = bj_block_stream(ctx, &o, &err);
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:waiting JSC:pending COMPLETED "
                      "JSC:concluded JSC:null");
    bj_job_unref(&job);
    bj_context_free(&ctx);
    CHECK_INT(chain_length(), 1);
}

static void stream_stop_then_resume(void)
{
    BjContext *ctx = setup("read_aio", 28);
    BjStreamOptions o = stream_defaults();
    BjError *err = NULL;
    Trace t = {0};
    BjJob *job;
    o.on_error = BJ_BLOCKDEV_ON_ERROR_ENOSPC;
    job = bj_block_stream(ctx, &o, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PAUSED, 10000));
    CHECK(bj_job_user_resume(job, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, "JSC:created JSC:running ERR(read,stop) JSC:paused JSC:running "
                      "JSC:waiting JSC:pending COMPLETED JSC:concluded JSC:null");
    bj_job_unref(&job);
    bj_context_free(&ctx);
    CHECK_INT(chain_length(), 1);
}

static void stream_ignore_fails_and_keeps_the_chain(void)
{
    BjContext *ctx = setup("read_aio", 5);
    BjStreamOptions o = stream_defaults();
    BjError *err = NULL;
    Trace t = {0};
    BjJob *job;
    o.on_error = BJ_BLOCKDEV_ON_ERROR_IGNORE;
    job = bj_block_stream(ctx, &o, &err);
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, "JSC:created JSC:running ERR(read,ignore) JSC:aborting "
                      "COMPLETED(Input/output error) JSC:concluded JSC:null");
    bj_job_unref(&job);
    bj_context_free(&ctx);
    CHECK_INT(chain_length(), 3);
}

static void active_commit_completes_at_ready(void)
{
    BjContext *ctx = setup(NULL, 0);
    BjCommitOptions o = commit_defaults();
    BjError *err = NULL;
    Trace t = {0};
    BjJob *job = bj_block_commit(ctx, &o, &err);
    CHECK_NO_ERR(err);
    trace_until_ready(ctx, &t);
    CHECK(bj_job_complete(job, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:ready READY JSC:waiting JSC:pending "
                      "COMPLETED JSC:concluded JSC:null");
    bj_job_unref(&job);
    bj_context_free(&ctx);
    /* Active commit leaves the headers alone. */
    CHECK_INT(chain_length(), 3);
    /* Base now holds what the guest saw: top's data at 3 MiB. */
    sh("qemu-io -c 'read -P 3 3M 512k' -c 'read -P 2 1M 1M' %s >/dev/null", base_path);
}

static void intermediate_commit_relinks_top(void)
{
    BjContext *ctx = setup(NULL, 0);
    BjCommitOptions o = commit_defaults();
    BjError *err = NULL;
    Trace t = {0};
    BjJob *job;
    /* The implicitly opened mid is top's backing; name it by its file. */
    o.top = mid_path;
    job = bj_block_commit(ctx, &o, &err);
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:waiting JSC:pending COMPLETED "
                      "JSC:concluded JSC:null");
    bj_job_unref(&job);
    bj_context_free(&ctx);
    CHECK_INT(chain_length(), 2);
    /* Top now reads mid's old data from base. */
    sh("qemu-io -c 'read -P 2 1M 1M' -c 'read -P 3 3M 512k' -c 'read -P 1 0 1M' %s >/dev/null",
       top_path);
    sh("qemu-io -c 'read -P 2 1M 1M' %s >/dev/null", base_path);
}

static void bad_input(void)
{
    BjContext *ctx = setup(NULL, 0);
    BjStreamOptions s = stream_defaults();
    BjCommitOptions c = commit_defaults();
    BjError *err = NULL;
    char msg[2048];
    CHECK(bj_block_stream(ctx, NULL, &err) == NULL);
    CHECK(err);
    bj_error_free(&err);
    s.device = NULL;
    CHECK(bj_block_stream(ctx, &s, &err) == NULL);
    CHECK(err);
    bj_error_free(&err);
    s = stream_defaults();
    s.base_node = "nosuch";
    CHECK(bj_block_stream(ctx, &s, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Cannot find device='' nor node-name='nosuch'");
    s = stream_defaults();
    s.base = "/nonexistent.qcow2";
    CHECK(bj_block_stream(ctx, &s, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Can't find '/nonexistent.qcow2' in the backing chain");
    s = stream_defaults();
    s.reserved[3] = 1;
    CHECK(bj_block_stream(ctx, &s, &err) == NULL);
    CHECK(err);
    bj_error_free(&err);
    s = stream_defaults();
    s.on_error = 99;
    CHECK(bj_block_stream(ctx, &s, &err) == NULL);
    CHECK(err);
    bj_error_free(&err);
    c.device = "nosuch";
    CHECK(bj_block_commit(ctx, &c, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_DEVICE_NOT_FOUND, "Device 'nosuch' not found");
    c = commit_defaults();
    c.top = top_path;
    c.base = top_path;
    CHECK(bj_block_commit(ctx, &c, &err) == NULL);
    /* base is looked up below top, so top itself is not found. */
    snprintf(msg, sizeof(msg), "Can't find '%s' in the backing chain", top_path);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, msg);
    /* Filter names QEMU refuses, with its texts (a stream's with its
     * bdrv_insert_node prefix). */
    s = stream_defaults();
    s.filter_node_name = "top";
    CHECK(bj_block_stream(ctx, &s, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Could not create node: Duplicate nodes with node-name='top'");
    c = commit_defaults();
    c.filter_node_name = "bad name";
    CHECK(bj_block_commit(ctx, &c, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid node-name: 'bad name'");
    bj_context_free(&ctx);
    CHECK_INT(chain_length(), 3);
}

/* A named filter while the job runs: a stream's copy-on-read node above
 * the top, gone when the job is. */
static void stream_filter_node_name(void)
{
    BjContext *ctx = setup(NULL, 0);
    BjStreamOptions o = stream_defaults();
    BjError *err = NULL;
    Trace t = {0};
    const char *query = "{\"execute\":\"query-named-block-nodes\","
                        "\"arguments\":{\"flat\":true}}";
    char *r;
    BjJob *job;

    o.filter_node_name = "cor";
    o.speed = 1; /* the first chunk, then it waits */
    job = bj_block_stream(ctx, &o, &err);
    CHECK_NO_ERR(err);
    r = bj_qmp_execute(ctx, query, &err);
    CHECK_NO_ERR(err);
    CHECK(strstr(r, "\"node-name\":\"cor\",\"drv\":\"copy-on-read\""));
    bj_free(r);
    CHECK(bj_block_job_set_speed(job, 0, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    r = bj_qmp_execute(ctx, query, &err);
    CHECK_NO_ERR(err);
    CHECK(!strstr(r, "copy-on-read"));
    bj_free(r);
    bj_job_unref(&job);
    bj_context_free(&ctx);
    CHECK_INT(chain_length(), 1);
}

int main(void)
{
    RUN(stream_flattens);
    RUN(stream_stop_then_resume);
    RUN(stream_ignore_fails_and_keeps_the_chain);
    RUN(active_commit_completes_at_ready);
    RUN(intermediate_commit_relinks_top);
    RUN(bad_input);
    RUN(stream_filter_node_name);
    return 0;
}
