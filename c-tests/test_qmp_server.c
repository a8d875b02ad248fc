/*
 * bj_qmp_server_new: a C host serves QEMU's monitor on a UNIX socket it
 * names, and a plain socket client (a thread: socket/connect/read/write,
 * no library calls) reads the greeting, negotiates, mirrors one node to
 * another, completes the job, gets QEMU's reply to a bad command and
 * quits; the host's quit callback fires and the host frees the server.
 * Also: the argument errors, and a free with clients still connected.
 */
#include <pthread.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "util.h"

/* ---- a line client over a UNIX socket ------------------------------------ */

typedef struct {
    int fd;
    char buf[65536];
    size_t len;
} Conn;

static void conn_open(Conn *c, const char *path)
{
    struct sockaddr_un a;
    memset(&a, 0, sizeof(a));
    a.sun_family = AF_UNIX;
    CHECK(strlen(path) < sizeof(a.sun_path));
    strcpy(a.sun_path, path);
    c->len = 0;
    c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(c->fd >= 0);
    CHECK(connect(c->fd, (struct sockaddr *)&a, sizeof(a)) == 0);
}

static void conn_close(Conn *c)
{
    close(c->fd);
    c->fd = -1;
}

/* MSG_NOSIGNAL: this process keeps SIGPIPE's default action, so that a
 * server thread writing to a vanished client would kill it (the library
 * must not rely on the host ignoring SIGPIPE). */
static void conn_send(Conn *c, const char *text)
{
    /* One send with the newline: the server executes a command as soon
     * as its JSON is complete, and after `quit` the host may close us
     * before a separate newline would go out. */
    char msg[1024];
    size_t n = (size_t)snprintf(msg, sizeof(msg), "%s\n", text), off = 0;
    CHECK(n < sizeof(msg));
    while (off < n) {
        ssize_t w = send(c->fd, msg + off, n - off, MSG_NOSIGNAL);
        CHECK(w > 0);
        off += (size_t)w;
    }
}

/* The next message without its CRLF (malloc'd), NULL at EOF (or reset).
 * Each message must end in CRLF, as QEMU's do. */
static char *conn_line(Conn *c)
{
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        struct pollfd p;
        ssize_t n;
        if (nl) {
            size_t len = (size_t)(nl - c->buf);
            char *line;
            CHECK(len > 0 && c->buf[len - 1] == '\r');
            line = malloc(len);
            CHECK(line);
            memcpy(line, c->buf, len - 1);
            line[len - 1] = 0;
            c->len -= len + 1;
            memmove(c->buf, nl + 1, c->len);
            return line;
        }
        CHECK(c->len < sizeof(c->buf));
        p.fd = c->fd;
        p.events = POLLIN;
        p.revents = 0;
        if (poll(&p, 1, 30000) <= 0) {
            FAIL("no message from the server within 30 s");
        }
        n = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);
        /* A server that closes with bytes of ours unread resets. */
        CHECK(n >= 0 || errno == ECONNRESET);
        if (n <= 0) {
            CHECK(c->len == 0);
            return NULL;
        }
        c->len += (size_t)n;
    }
}

static int is_event(const char *line, const char *name)
{
    char want[128];
    snprintf(want, sizeof(want), "\"event\": \"%s\"", name);
    return strstr(line, want) != NULL;
}

/* The text of the last BLOCK_JOB_READY seen. */
static char ready_line[1024];

/* Append an event's short name to `seen`: "JSC:<status>" for
 * JOB_STATUS_CHANGE, else the event's name, "(error)" added to a
 * BLOCK_JOB_COMPLETED that carries one. */
static void summarize_line(const char *l, char *seen, size_t seen_len)
{
    const char *st = strstr(l, "\"status\": \"");
    const char *ev = strstr(l, "\"event\": \"");
    size_t len = strlen(seen);
    CHECK(ev);
    ev += 10;
    if (is_event(l, "JOB_STATUS_CHANGE") && st) {
        snprintf(seen + len, seen_len - len, "%sJSC:%.*s", len ? " " : "",
                 (int)strcspn(st + 11, "\""), st + 11);
        return;
    }
    if (is_event(l, "BLOCK_JOB_READY")) {
        snprintf(ready_line, sizeof(ready_line), "%s", l);
    }
    snprintf(seen + len, seen_len - len, "%s%.*s%s", len ? " " : "",
             (int)strcspn(ev, "\""), ev,
             is_event(l, "BLOCK_JOB_COMPLETED") && strstr(l, "\"error\"") ? "(error)" : "");
}

/* Read until the first line that is not an event: that reply (malloc'd);
 * the events before it are appended to `seen`. */
static char *conn_reply(Conn *c, char *seen, size_t seen_len)
{
    char *l;
    while ((l = conn_line(c)) && strstr(l, "\"event\": ")) {
        summarize_line(l, seen, seen_len);
        free(l);
    }
    CHECK(l);
    return l;
}

/* Read events into `seen` until it ends with `last` (at once if it does). */
static void conn_until(Conn *c, char *seen, size_t seen_len, const char *last)
{
    size_t n = strlen(last);
    while (strlen(seen) < n || strcmp(seen + strlen(seen) - n, last) != 0) {
        char *l = conn_line(c);
        if (!l) {
            FAIL("EOF waiting for %s; saw %s", last, seen);
        }
        summarize_line(l, seen, seen_len);
        free(l);
    }
}

static void expect_line(Conn *c, const char *want)
{
    char *l = conn_line(c);
    CHECK_STR(l, want);
    free(l);
}

/* ---- the host ------------------------------------------------------------- */

typedef struct {
    int pipe[2];     /* the quit callback writes one byte */
    int quits;
    int freed;
} Host;

static void host_quit(void *opaque)
{
    Host *h = opaque;
    __atomic_add_fetch(&h->quits, 1, __ATOMIC_SEQ_CST);
    CHECK(write(h->pipe[1], "q", 1) == 1);
}

static void host_quit_free(void *opaque)
{
    Host *h = opaque;
    h->freed++;
}

static BjContext *ctx_with_nodes(void)
{
    BjContext *ctx = new_ctx();
    BjError *err = NULL;
    CHECK(bj_blockdev_add(ctx, "{\"driver\":\"null-co\",\"node-name\":\"src\",\"size\":4194304}", &err));
    CHECK(bj_blockdev_add(ctx, "{\"driver\":\"null-co\",\"node-name\":\"dst\",\"size\":4194304}", &err));
    CHECK_NO_ERR(err);
    return ctx;
}

static BjQmpServerOptions server_opts(const char *path, Host *h)
{
    BjQmpServerOptions o;
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.path = path;
    if (h) {
        o.quit = host_quit;
        o.quit_opaque = h;
        o.quit_free = host_quit_free;
    }
    return o;
}

static void sock_path(char *path, size_t n, const char *name)
{
    CHECK(snprintf(path, n, "%s/%s", tmpdir(), name) < (int)n);
}

/* ---- the cases ------------------------------------------------------------ */

static void *mirror_client(void *arg)
{
    Conn *c = arg;
    char seen[1024] = "";
    char *l;

    /* QEMU's greeting, byte for byte but for the package. */
    l = conn_line(c);
    CHECK(l);
    {
        static const char want[] = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, "
                                   "\"minor\": 0, \"major\": 10}, \"package\": \"blockjob ";
        if (strncmp(l, want, strlen(want)) != 0) {
            FAIL("greeting %s", l);
        }
    }
    CHECK(strstr(l, "}, \"capabilities\": [\"oob\"]}}"));
    free(l);
    conn_send(c, "{\"execute\":\"query-jobs\"}");
    expect_line(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": "
                   "\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}");
    conn_send(c, "{\"execute\":\"qmp_capabilities\"}");
    expect_line(c, "{\"return\": {}}");

    /* The events the command caused come before its reply. */
    conn_send(c, "{\"execute\":\"blockdev-mirror\",\"arguments\":{\"job-id\":\"m\","
                 "\"device\":\"src\",\"target\":\"dst\",\"sync\":\"full\"},\"id\":\"m1\"}");
    l = conn_reply(c, seen, sizeof(seen));
    CHECK_STR(l, "{\"return\": {}, \"id\": \"m1\"}");
    free(l);
    CHECK(strncmp(seen, "JSC:created JSC:running", 23) == 0);
    conn_until(c, seen, sizeof(seen), "BLOCK_JOB_READY");
    CHECK_STR(seen, "JSC:created JSC:running JSC:ready BLOCK_JOB_READY");
    CHECK(strstr(ready_line, "\"data\": {\"type\": \"mirror\", \"device\": \"m\", "
                             "\"len\": 4194304, \"offset\": 4194304, \"speed\": 0}"));

    conn_send(c, "{\"execute\":\"block-job-complete\",\"arguments\":{\"device\":\"m\"}}");
    seen[0] = 0;
    l = conn_reply(c, seen, sizeof(seen));
    CHECK_STR(l, "{\"return\": {}}");
    free(l);
    conn_until(c, seen, sizeof(seen), "JSC:null");
    CHECK_STR(seen, "JSC:waiting JSC:pending BLOCK_JOB_COMPLETED JSC:concluded JSC:null");

    /* QEMU's reply to an unknown command, `id` first as QEMU writes it. */
    conn_send(c, "{\"execute\":\"nope\",\"id\":7}");
    expect_line(c, "{\"id\": 7, \"error\": {\"class\": \"CommandNotFound\", "
                   "\"desc\": \"The command nope has not been found\"}}");
    conn_send(c, "{\"execute\":\"query-jobs\"}");
    expect_line(c, "{\"return\": []}");

    /* quit: answered; then nothing runs any more, the host frees us. The
     * host may have freed the server (closing us) before this send: then
     * it fails with EPIPE or ECONNRESET, which is fine; what must not come
     * is a reply. */
    conn_send(c, "{\"execute\":\"quit\"}");
    expect_line(c, "{\"return\": {}}");
    {
        static const char late[] = "{\"execute\":\"query-jobs\"}\n";
        ssize_t w = send(c->fd, late, sizeof(late) - 1, MSG_NOSIGNAL);
        CHECK(w == (ssize_t)(sizeof(late) - 1) || errno == EPIPE || errno == ECONNRESET);
    }
    l = conn_line(c);
    CHECK(l == NULL); /* EOF when the host freed the server: no reply */
    return NULL;
}

static void a_c_client_mirrors_and_quits(void)
{
    BjContext *ctx = ctx_with_nodes();
    BjError *err = NULL;
    Host h = { { -1, -1 }, 0, 0 };
    char path[512], q;
    struct stat st;
    BjQmpServerOptions o;
    BjQmpServer *srv;
    pthread_t t;
    Conn c;
    struct pollfd p;

    sock_path(path, sizeof(path), "qmp.sock");
    CHECK(pipe(h.pipe) == 0);
    o = server_opts(path, &h);
    srv = bj_qmp_server_new(ctx, &o, &err);
    CHECK_NO_ERR(err);
    CHECK(srv);
    CHECK(lstat(path, &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    {
        /* The mode the umask leaves, as QEMU's sockets. */
        mode_t mask = umask(0);
        umask(mask);
        CHECK_INT(st.st_mode & 0777, 0777 & ~mask);
    }

    conn_open(&c, path);
    CHECK(pthread_create(&t, NULL, mirror_client, &c) == 0);
    /* The host's main loop: wait for the quit callback. */
    p.fd = h.pipe[0];
    p.events = POLLIN;
    p.revents = 0;
    CHECK(poll(&p, 1, 60000) == 1);
    CHECK(read(h.pipe[0], &q, 1) == 1);
    CHECK_INT(__atomic_load_n(&h.quits, __ATOMIC_SEQ_CST), 1);
    CHECK_INT(h.freed, 0);
    bj_qmp_server_free(&srv);
    CHECK(srv == NULL);
    CHECK(pthread_join(t, NULL) == 0);
    conn_close(&c);
    CHECK_INT(h.quits, 1);
    CHECK_INT(h.freed, 1);
    /* QEMU unlinks its socket when it closes. */
    CHECK(lstat(path, &st) != 0 && errno == ENOENT);
    close(h.pipe[0]);
    close(h.pipe[1]);
    bj_context_free(&ctx);
}

static void free_with_clients_connected(void)
{
    BjContext *ctx = ctx_with_nodes();
    BjError *err = NULL;
    char path[512];
    BjQmpServerOptions o;
    BjQmpServer *srv, *other;
    Conn a, b, late;
    char *l;
    sock_path(path, sizeof(path), "free.sock");
    o = server_opts(path, NULL);
    o.pretty = true;
    srv = bj_qmp_server_new(ctx, &o, &err);
    CHECK_NO_ERR(err);

    /* Several monitors on one context: a second server elsewhere. */
    {
        char path2[512];
        sock_path(path2, sizeof(path2), "other.sock");
        o = server_opts(path2, NULL);
        other = bj_qmp_server_new(ctx, &o, &err);
        CHECK_NO_ERR(err);
    }

    /* a: negotiated, pretty output as QEMU's pretty=on. */
    conn_open(&a, path);
    l = conn_line(&a);
    CHECK(l && strncmp(l, "{", 1) == 0);
    free(l);
    /* The pretty greeting spans lines: skip to its last one. */
    while ((l = conn_line(&a)) && strcmp(l, "}") != 0) {
        free(l);
    }
    free(l);
    conn_send(&a, "{\"execute\":\"qmp_capabilities\"}");
    expect_line(&a, "{");
    expect_line(&a, "    \"return\": {");
    expect_line(&a, "    }");
    expect_line(&a, "}");
    /* b: connected, mid-line, never negotiated; late: nothing at all. */
    conn_open(&b, path);
    conn_send(&b, "{\"execute\": \"qmp_");
    conn_open(&late, path);
    /* gone: leaves mid-command; the server's reply meets a closed socket
     * (EPIPE, and no SIGPIPE for this process). */
    {
        Conn gone;
        conn_open(&gone, path);
        conn_send(&gone, "{\"execute\":\"qmp_capabilities\"}\n"
                         "{\"execute\":\"query-named-block-nodes\"}");
        conn_close(&gone);
    }

    /* A job a client started outlives the server. */
    conn_send(&a, "{\"execute\":\"blockdev-mirror\",\"arguments\":{\"job-id\":\"m\","
                  "\"device\":\"src\",\"target\":\"dst\",\"sync\":\"full\",\"speed\":1048576}}");
    while ((l = conn_line(&a)) && strcmp(l, "    \"return\": {") != 0) {
        free(l);
    }
    CHECK(l);
    free(l);
    bj_qmp_server_free(&srv);
    bj_qmp_server_free(&srv); /* NULL is fine */
    bj_qmp_server_free(NULL);
    /* Every client sees EOF after what was sent to it. */
    while ((l = conn_line(&a))) {
        free(l);
    }
    while ((l = conn_line(&b))) {
        free(l);
    }
    while ((l = conn_line(&late))) {
        free(l);
    }
    conn_close(&a);
    conn_close(&b);
    conn_close(&late);
    CHECK(access(path, F_OK) != 0);
    {
        char *r = bj_qmp_execute(ctx, "{\"execute\":\"query-block-jobs\"}", &err);
        CHECK_NO_ERR(err);
        CHECK(strstr(r, "\"device\":\"m\""));
        bj_free(r);
    }
    bj_qmp_server_free(&other);
    bj_context_free(&ctx);
}

static void bad_arguments(void)
{
    BjContext *ctx = new_ctx();
    BjError *err = NULL;
    Host h = { { -1, -1 }, 0, 0 };
    char path[512], msg[700];
    BjQmpServerOptions o;
    BjQmpServer *srv;
    int fd;

    sock_path(path, sizeof(path), "bad.sock");
    o = server_opts(path, &h);

    CHECK(bj_qmp_server_new(ctx, NULL, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'opts' must not be NULL");
    o.size = 8;
    CHECK(bj_qmp_server_new(ctx, &o, &err) == NULL);
    CHECK(err && strstr(bj_error_get_pretty(err), "Invalid argument: opts->size is 8, expected sizeof(BjQmpServerOptions)"));
    bj_error_free(&err);
    /* Neither of those could be trusted to hold quit_free. */
    CHECK_INT(h.freed, 0);
    o.size = sizeof(o);

    CHECK(bj_qmp_server_new(NULL, &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'ctx' must not be NULL");
    CHECK_INT(h.freed, 1);
    o.path = NULL;
    CHECK(bj_qmp_server_new(ctx, &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'opts->path' must not be NULL");
    CHECK_INT(h.freed, 2);
    o.path = path;
    o.reserved[3] = 1;
    CHECK(bj_qmp_server_new(ctx, &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: opts->reserved must be zero");
    CHECK_INT(h.freed, 3);
    o.reserved[3] = 0;

    /* Whatever is at the path is unlinked first, as QEMU does; what
     * cannot be (a directory) fails with QEMU's text. */
    CHECK(mkdir(path, 0700) == 0);
    CHECK(bj_qmp_server_new(ctx, &o, &err) == NULL);
    snprintf(msg, sizeof(msg), "Failed to unlink socket %s: Is a directory", path);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, msg);
    CHECK_INT(h.freed, 4);
    CHECK(access(path, F_OK) == 0);
    CHECK(rmdir(path) == 0);
    o.path = "/nonexistent/dir/q.sock";
    CHECK(bj_qmp_server_new(ctx, &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Failed to bind socket to /nonexistent/dir/q.sock: No such file or directory");
    CHECK_INT(h.freed, 5);

    /* A stale socket file (nobody listening) is replaced, as QEMU does. */
    {
        struct sockaddr_un a;
        memset(&a, 0, sizeof(a));
        a.sun_family = AF_UNIX;
        strcpy(a.sun_path, path);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        CHECK(fd >= 0);
        CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
        close(fd);
    }
    o.path = path;
    srv = bj_qmp_server_new(ctx, &o, &err);
    CHECK_NO_ERR(err);
    bj_qmp_server_free(&srv);
    CHECK_INT(h.freed, 6);
    CHECK_INT(h.quits, 0);
    bj_context_free(&ctx);
}

int main(void)
{
    RUN(bad_arguments);
    RUN(a_c_client_mirrors_and_quits);
    RUN(free_with_clients_connected);
    return 0;
}
