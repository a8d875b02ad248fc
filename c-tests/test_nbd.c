/*
 * NBD exports from a C host: bj_nbd_server_start on a UNIX socket and on
 * TCP (port "0" and the port the system chose), bj_block_export_add of a
 * node, writable; qemu-io writes and qemu-img compare reads through the
 * export as child processes (fork/exec), and the data is checked in the
 * node; bj_block_export_del safe (refused while a client is connected)
 * and hard; every refusal with QEMU's text; bj_nbd_server_stop leaves no
 * thread, descriptor or socket file behind.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "util.h"

#define MiB (1024 * 1024)
#define IMG_SIZE (4 * MiB)

/* ---- helpers ------------------------------------------------------------------ */

/* Entries of /proc/self/<dir> (threads in "task", descriptors in "fd"). */
static int count_entries(const char *dir)
{
    char path[64];
    DIR *d;
    struct dirent *e;
    int n = 0;
    snprintf(path, sizeof(path), "/proc/self/%s", dir);
    d = opendir(path);
    CHECK(d);
    while ((e = readdir(d))) {
        n += e->d_name[0] != '.';
    }
    closedir(d);
    return n - (strcmp(dir, "fd") == 0); /* opendir's own descriptor */
}

/* Run argv (NULL-terminated) as a child process with stdout and stderr
 * in `out`; its exit status (or -1 when killed). */
static int run_tool(char *out, size_t out_len, char *const argv[])
{
    int p[2], status;
    size_t len = 0;
    pid_t pid;
    CHECK(pipe(p) == 0);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        dup2(p[1], 1);
        dup2(p[1], 2);
        close(p[0]);
        close(p[1]);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(p[1]);
    for (;;) {
        ssize_t n = read(p[0], out + len, out_len - 1 - len);
        if (n <= 0) {
            break;
        }
        len += (size_t)n;
        if (len == out_len - 1) {
            break;
        }
    }
    out[len] = 0;
    close(p[0]);
    CHECK(waitpid(pid, &status, 0) == pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void start_unix(BjContext *ctx, const char *sock)
{
    BjNbdServerOptions o;
    BjError *err = NULL;
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.path = sock;
    CHECK(bj_nbd_server_start(ctx, &o, &err));
    CHECK_NO_ERR(err);
}

static BjBlockExportOptions export_opts(const char *id, const char *node, const char *name,
                                        bool writable)
{
    BjBlockExportOptions e;
    memset(&e, 0, sizeof(e));
    e.size = sizeof(e);
    e.id = id;
    e.node_name = node;
    e.name = name;
    e.writable = writable;
    return e;
}

static void export_add(BjContext *ctx, const char *id, const char *node, const char *name,
                       bool writable)
{
    BjBlockExportOptions e = export_opts(id, node, name, writable);
    BjError *err = NULL;
    CHECK(bj_block_export_add(ctx, &e, &err));
    CHECK_NO_ERR(err);
}

/* The next event's JSON must name `name` and contain `text`. */
static void expect_event(BjContext *ctx, const char *name, const char *text)
{
    BjEvent *ev = next_event(ctx, 5000);
    if (!ev) {
        FAIL("no %s event", name);
    }
    CHECK_STR(ev->name, name);
    if (!strstr(ev->json, text)) {
        FAIL("%s lacks %s", ev->json, text);
    }
    bj_event_free(&ev);
}

/* block-export-del safe of an export whose clients have exited: the
 * server notices their EOF asynchronously, so "still in use" may come
 * for a moment, never for long. */
static void del_when_idle(BjContext *ctx, const char *id)
{
    BjError *err = NULL;
    char want[128];
    int i;
    snprintf(want, sizeof(want), "export '%s' still in use", id);
    for (i = 0; i < 1000; i++) {
        if (bj_block_export_del(ctx, id, BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE, &err)) {
            CHECK_NO_ERR(err);
            return;
        }
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, want);
        sleep_ms(10);
    }
    FAIL("%s", want);
}

/* A client that negotiates with NBD_OPT_EXPORT_NAME (fixed newstyle, no
 * zeroes) and stays connected: the export now has a client. */
static int nbd_client(const char *sock, const char *name)
{
    struct sockaddr_un a;
    unsigned char hello[18], reply[10], opt[16];
    uint32_t flags = htonl(3), len = htonl((uint32_t)strlen(name));
    size_t got = 0;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(fd >= 0);
    memset(&a, 0, sizeof(a));
    a.sun_family = AF_UNIX;
    CHECK(strlen(sock) < sizeof(a.sun_path));
    strcpy(a.sun_path, sock);
    CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
    while (got < sizeof(hello)) {
        ssize_t n = read(fd, hello + got, sizeof(hello) - got);
        CHECK(n > 0);
        got += (size_t)n;
    }
    CHECK(memcmp(hello, "NBDMAGICIHAVEOPT", 16) == 0);
    CHECK(send(fd, &flags, 4, MSG_NOSIGNAL) == 4);
    /* IHAVEOPT, NBD_OPT_EXPORT_NAME (1), length, name. */
    memcpy(opt, "IHAVEOPT", 8);
    opt[8] = opt[9] = opt[10] = 0;
    opt[11] = 1;
    memcpy(opt + 12, &len, 4);
    CHECK(send(fd, opt, sizeof(opt), MSG_NOSIGNAL) == (ssize_t)sizeof(opt));
    CHECK(send(fd, name, strlen(name), MSG_NOSIGNAL) == (ssize_t)strlen(name));
    /* Export size (8) and transmission flags (2). */
    got = 0;
    while (got < sizeof(reply)) {
        ssize_t n = read(fd, reply + got, sizeof(reply) - got);
        CHECK(n > 0);
        got += (size_t)n;
    }
    CHECK(reply[4] == 0 && reply[5] == 0x40 && reply[6] == 0 && reply[7] == 0); /* 4 MiB */
    return fd;
}

static char img[512], ref[512], sock[512];

/* A 4 MiB raw image of 0x11 as node "disk". */
static BjContext *setup(void)
{
    BjContext *ctx = new_ctx();
    make_image(img, sizeof(img), "disk.raw", IMG_SIZE, 0x11);
    make_image(ref, sizeof(ref), "ref.raw", IMG_SIZE, 0x11);
    snprintf(sock, sizeof(sock), "%s/nbd.sock", tmpdir());
    add_raw(ctx, "disk", img, NULL, 0, 0);
    return ctx;
}

/* ---- cases -------------------------------------------------------------------- */

/* Every refusal before a server runs, and the NULL/size checks. */
static void test_argument_errors(void)
{
    BjContext *ctx = setup();
    BjError *err = NULL;
    BjNbdServerOptions o;
    BjBlockExportOptions e = export_opts("e0", "disk", NULL, true);
    BjBitmapRef bm = { NULL, NULL };

    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.path = sock;
    CHECK(!bj_nbd_server_start(NULL, &o, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'ctx' must not be NULL");
    CHECK(!bj_nbd_server_start(ctx, NULL, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'opts' must not be NULL");
    o.size = 8;
    CHECK(!bj_nbd_server_start(ctx, &o, &err));
    CHECK(err && strstr(bj_error_get_pretty(err), "opts->size is 8"));
    bj_error_free(&err);
    o.size = sizeof(o);
    o.host = "127.0.0.1";
    CHECK(!bj_nbd_server_start(ctx, &o, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Invalid argument: set either opts->path, or opts->host and opts->port");
    o.path = NULL;
    CHECK(!bj_nbd_server_start(ctx, &o, &err)); /* host without port */
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Invalid argument: set either opts->path, or opts->host and opts->port");
    o.path = sock;
    o.host = NULL;
    o.reserved[0] = 1;
    CHECK(!bj_nbd_server_start(ctx, &o, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: opts->reserved must be zero");
    o.reserved[0] = 0;
    o.tls_creds = "nope";
    CHECK(!bj_nbd_server_start(ctx, &o, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "No TLS credentials with id 'nope'");
    CHECK(access(sock, F_OK) != 0);

    /* No server: QEMU's texts. */
    CHECK(!bj_nbd_server_stop(ctx, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "NBD server not running");
    CHECK_INT(bj_nbd_server_get_port(ctx, &err), -1);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "NBD server not running");
    CHECK(!bj_block_export_add(ctx, &e, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "NBD server not running");
    e.node_name = "nope"; /* QEMU looks the node up first */
    CHECK(!bj_block_export_add(ctx, &e, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Cannot find device='' nor node-name='nope'");
    CHECK(!bj_block_export_del(ctx, "e0", BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Export 'e0' is not found");

    /* NULL and malformed arguments of the export calls. */
    CHECK(!bj_block_export_add(ctx, NULL, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'opts' must not be NULL");
    e.node_name = NULL;
    CHECK(!bj_block_export_add(ctx, &e, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Invalid argument: 'opts->node_name' must not be NULL");
    e.node_name = "disk";
    e.nbitmaps = 1;
    CHECK(!bj_block_export_add(ctx, &e, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Invalid argument: 'opts->bitmaps' must not be NULL");
    e.bitmaps = &bm;
    CHECK(!bj_block_export_add(ctx, &e, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Invalid argument: 'opts->bitmaps[0].name' must not be NULL");
    CHECK(!bj_block_export_del(ctx, NULL, BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'id' must not be NULL");
    CHECK(!bj_block_export_del(ctx, "e0", 7, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: mode 7 is out of range");
    CHECK(bj_query_block_exports(NULL, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'ctx' must not be NULL");

    /* Objects. */
    {
        BjTlsCredsX509Options t;
        memset(&t, 0, sizeof(t));
        t.size = sizeof(t);
        t.id = "tls0";
        t.endpoint = BJ_QCRYPTO_TLS_CREDS_ENDPOINT_SERVER;
        CHECK(!bj_tls_creds_x509_add(ctx, &t, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Missing 'dir' property value");
        t.id = "0bad";
        CHECK(!bj_tls_creds_x509_add(ctx, &t, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Parameter 'id' expects an identifier");
        t.id = "tls0";
        t.endpoint = 2;
        CHECK(!bj_tls_creds_x509_add(ctx, &t, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
                  "Invalid argument: opts->endpoint 2 is out of range");
        CHECK(!bj_object_del(ctx, "tls0", &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "object 'tls0' not found");
        CHECK(!bj_object_del(ctx, NULL, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'id' must not be NULL");
    }
    bj_context_free(&ctx);
}

/* A writable export on a UNIX socket: qemu-io writes through it, the
 * node has the data, qemu-img compares the export with the expected
 * image; the refusals of a running server; a clean stop. */
static void test_unix_export(void)
{
    BjContext *ctx = setup();
    BjError *err = NULL;
    BjNode *disk;
    char out[8192], url[600], urlro[600], buf[65536], *json;
    int threads = count_entries("task"), fds = count_entries("fd"), i, fd;

    start_unix(ctx, sock);
    CHECK(access(sock, F_OK) == 0);
    {
        BjNbdServerOptions o;
        memset(&o, 0, sizeof(o));
        o.size = sizeof(o);
        o.path = sock;
        CHECK(!bj_nbd_server_start(ctx, &o, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "NBD server already running");
    }
    CHECK_INT(bj_nbd_server_get_port(ctx, &err), -1);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "NBD server is not listening on TCP");

    export_add(ctx, "e0", "disk", "disk0", true);
    {
        BjBlockExportOptions e = export_opts("e0", "disk", "other", true);
        BjBitmapRef bm = { NULL, "nb" };
        CHECK(!bj_block_export_add(ctx, &e, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Block export id 'e0' is already in use");
        e.id = "e1";
        e.name = "disk0";
        CHECK(!bj_block_export_add(ctx, &e, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
                  "NBD server already has export named 'disk0'");
        e.name = "ro";
        e.node_name = "nope";
        CHECK(!bj_block_export_add(ctx, &e, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
                  "Cannot find device='' nor node-name='nope'");
        e.node_name = "disk";
        e.id = "1bad";
        CHECK(!bj_block_export_add(ctx, &e, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid block export id");
        e.id = "e1";
        e.bitmaps = &bm;
        e.nbitmaps = 1;
        CHECK(!bj_block_export_add(ctx, &e, &err));
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Bitmap 'nb' is not found");
    }
    export_add(ctx, "e1", "disk", "ro", false);
    json = bj_query_block_exports(ctx, &err);
    CHECK_NO_ERR(err);
    CHECK_STR(json, "[{\"id\":\"e1\",\"type\":\"nbd\",\"node-name\":\"disk\",\"shutting-down\":false},"
                    "{\"id\":\"e0\",\"type\":\"nbd\",\"node-name\":\"disk\",\"shutting-down\":false}]");
    bj_free(json);

    /* qemu-io writes 0xab at 1 MiB through the export. */
    snprintf(url, sizeof(url), "nbd+unix:///disk0?socket=%s", sock);
    snprintf(urlro, sizeof(urlro), "nbd+unix:///ro?socket=%s", sock);
    {
        char *argv[] = { "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", url, NULL };
        if (run_tool(out, sizeof(out), argv) != 0) {
            FAIL("qemu-io write: %s", out);
        }
    }
    disk = bj_node_find(ctx, "disk", &err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_node_pread(disk, MiB, buf, sizeof(buf), &err), 0);
    for (i = 0; i < (int)sizeof(buf); i++) {
        CHECK_INT((unsigned char)buf[i], 0xab);
    }
    CHECK_INT(bj_node_pread(disk, MiB - 1, buf, 1, &err), 0);
    CHECK_INT((unsigned char)buf[0], 0x11);
    bj_node_unref(&disk);
    CHECK_INT(file_byte(img, MiB + 100), 0xab);

    /* The read-only export refuses writes; both compare equal to what
     * the node should hold. */
    {
        char *argv[] = { "qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 4k", urlro, NULL };
        CHECK(run_tool(out, sizeof(out), argv) != 0 || strstr(out, "failed"));
        /* qemu-io opens it read-write and NBD says read-only: as with
         * qemu-nbd -r. */
        if (!strstr(out, "Could not open image: Permission denied")) {
            FAIL("qemu-io on the read-only export: %s", out);
        }
    }
    fd = open(ref, O_WRONLY);
    CHECK(fd >= 0);
    memset(buf, 0xab, sizeof(buf));
    CHECK(pwrite(fd, buf, sizeof(buf), MiB) == (ssize_t)sizeof(buf));
    close(fd);
    {
        char *argv[] = { "qemu-img", "compare", "-f", "raw", "-F", "raw", ref, url, NULL };
        char *argv2[] = { "qemu-img", "compare", "-f", "raw", "-F", "raw", ref, urlro, NULL };
        if (run_tool(out, sizeof(out), argv) != 0) {
            FAIL("qemu-img compare: %s", out);
        }
        CHECK(strstr(out, "Images are identical."));
        if (run_tool(out, sizeof(out), argv2) != 0) {
            FAIL("qemu-img compare (ro): %s", out);
        }
    }

    discard_events(ctx);
    del_when_idle(ctx, "e1");
    expect_event(ctx, "BLOCK_EXPORT_DELETED", "\"id\":\"e1\"");
    CHECK(!bj_block_export_del(ctx, "e1", BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Export 'e1' is not found");

    /* Stop: the remaining export goes (hard), threads and fds too. */
    CHECK(bj_nbd_server_stop(ctx, &err));
    CHECK_NO_ERR(err);
    expect_event(ctx, "BLOCK_EXPORT_DELETED", "\"id\":\"e0\"");
    CHECK(access(sock, F_OK) != 0);
    json = bj_query_block_exports(ctx, &err);
    CHECK_STR(json, "[]");
    bj_free(json);
    CHECK_INT(count_entries("task"), threads);
    CHECK_INT(count_entries("fd"), fds);
    /* And it starts again on the same path. */
    start_unix(ctx, sock);
    CHECK(bj_nbd_server_stop(ctx, &err));
    bj_context_free(&ctx);
}

/* TCP on port "0": the system's port is what bj_nbd_server_get_port says
 * and what qemu-img connects to. */
static void test_tcp_port_zero(void)
{
    BjContext *ctx = setup();
    BjError *err = NULL;
    BjNbdServerOptions o;
    char out[8192], url[128];
    int port;

    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.host = "127.0.0.1";
    o.port = "0";
    o.max_connections = 4;
    o.has_handshake_max_seconds = true;
    o.handshake_max_seconds = 5;
    CHECK(bj_nbd_server_start(ctx, &o, &err));
    CHECK_NO_ERR(err);
    port = bj_nbd_server_get_port(ctx, &err);
    CHECK_NO_ERR(err);
    CHECK(port > 0 && port < 65536);
    export_add(ctx, "e0", "disk", NULL, false); /* named as its node */
    snprintf(url, sizeof(url), "nbd://127.0.0.1:%d/disk", port);
    {
        char *argv[] = { "qemu-img", "compare", "-f", "raw", "-F", "raw", ref, url, NULL };
        if (run_tool(out, sizeof(out), argv) != 0) {
            FAIL("qemu-img compare %s: %s", url, out);
        }
    }
    CHECK(bj_nbd_server_stop(ctx, &err));
    CHECK_NO_ERR(err);
    CHECK_INT(bj_nbd_server_get_port(ctx, &err), -1);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "NBD server not running");
    bj_context_free(&ctx);
}

/* block-export-del safe is refused while a client is connected and works
 * once it left; hard disconnects the client. */
static void test_export_del_modes(void)
{
    BjContext *ctx = setup();
    BjError *err = NULL;
    char c;
    int fd;

    start_unix(ctx, sock);
    export_add(ctx, "e0", "disk", NULL, true);
    fd = nbd_client(sock, "disk");
    CHECK(!bj_block_export_del(ctx, "e0", BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "export 'e0' still in use");
    close(fd);
    del_when_idle(ctx, "e0");

    export_add(ctx, "e0", "disk", NULL, true);
    fd = nbd_client(sock, "disk");
    CHECK(bj_block_export_del(ctx, "e0", BJ_BLOCK_EXPORT_REMOVE_MODE_HARD, &err));
    CHECK_NO_ERR(err);
    CHECK(read(fd, &c, 1) <= 0); /* disconnected */
    close(fd);
    /* A client still connected at stop is disconnected too. */
    export_add(ctx, "e0", "disk", NULL, true);
    fd = nbd_client(sock, "disk");
    CHECK(bj_nbd_server_stop(ctx, &err));
    CHECK_NO_ERR(err);
    CHECK(read(fd, &c, 1) <= 0);
    close(fd);
    bj_context_free(&ctx);
}

/* A context freed with the server running and a client connected stops
 * it (valgrind: nothing leaks). */
static void test_context_free_stops_server(void)
{
    BjContext *ctx = setup();
    char c;
    int fd;
    start_unix(ctx, sock);
    export_add(ctx, "e0", "disk", NULL, true);
    fd = nbd_client(sock, "disk");
    bj_context_free(&ctx);
    CHECK(read(fd, &c, 1) <= 0);
    close(fd);
    CHECK(access(sock, F_OK) != 0);
}

/* TLS: credentials from $BJ_PKI (made by the harness with certtool),
 * a server on TCP that requires them; qemu-io with a client certificate
 * reads through it, qemu-io without TLS gets nothing. */
static void test_tls_server(void)
{
    BjContext *ctx = setup();
    BjError *err = NULL;
    BjTlsCredsX509Options t;
    BjNbdServerOptions o;
    const char *pki = getenv("BJ_PKI");
    char out[8192], obj[700], opts[300], url[128];
    int port;

    if (!pki) {
        FAIL("BJ_PKI is not set (tests/c_harness.rs sets it)");
    }
    memset(&t, 0, sizeof(t));
    t.size = sizeof(t);
    t.id = "tls0";
    t.dir = pki;
    t.endpoint = BJ_QCRYPTO_TLS_CREDS_ENDPOINT_SERVER;
    CHECK(bj_tls_creds_x509_add(ctx, &t, &err));
    CHECK_NO_ERR(err);
    CHECK(!bj_tls_creds_x509_add(ctx, &t, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "attempt to add duplicate property 'tls0' to object (type 'container')");

    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.host = "127.0.0.1";
    o.port = "0";
    o.tls_creds = "tls0";
    CHECK(bj_nbd_server_start(ctx, &o, &err));
    CHECK_NO_ERR(err);
    /* The server keeps its credentials when the object goes (QEMU). */
    CHECK(bj_object_del(ctx, "tls0", &err));
    CHECK_NO_ERR(err);
    port = bj_nbd_server_get_port(ctx, &err);
    CHECK_NO_ERR(err);
    export_add(ctx, "e0", "disk", NULL, false);

    snprintf(obj, sizeof(obj), "tls-creds-x509,id=c0,dir=%s,endpoint=client", pki);
    snprintf(opts, sizeof(opts),
             "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%d,"
             "export=disk,tls-creds=c0", port);
    {
        char *argv[] = { "qemu-io", "-r", "--object", obj, "--image-opts", opts,
                         "-c", "read -P 0x11 0 64k", NULL };
        if (run_tool(out, sizeof(out), argv) != 0 || strstr(out, "fail")) {
            FAIL("qemu-io over TLS: %s", out);
        }
    }
    snprintf(url, sizeof(url), "nbd://127.0.0.1:%d/disk", port);
    {
        char *argv[] = { "qemu-io", "-f", "raw", "-r", "-c", "read 0 512", url, NULL };
        CHECK(run_tool(out, sizeof(out), argv) != 0);
        if (!strstr(out, "TLS")) {
            FAIL("qemu-io without TLS: %s", out);
        }
    }
    CHECK(bj_nbd_server_stop(ctx, &err));
    CHECK_NO_ERR(err);
    bj_context_free(&ctx);
}

int main(void)
{
    signal(SIGPIPE, SIG_DFL);
    RUN(test_argument_errors);
    RUN(test_unix_export);
    RUN(test_tcp_port_zero);
    RUN(test_export_del_modes);
    RUN(test_context_free_stops_server);
    RUN(test_tls_server);
    return 0;
}
