/*
 * bj_qmp_execute: QMP commands from C, QEMU's replies and error classes,
 * and events as QMP JSON.
 */
#include "util.h"

/* The reply to `cmd`, checked to contain `want`; freed here. */
static void expect_reply(BjContext *ctx, const char *cmd, const char *want)
{
    BjError *err = NULL;
    char *r = bj_qmp_execute(ctx, cmd, &err);
    CHECK_NO_ERR(err);
    CHECK(r);
    if (!strstr(r, want)) {
        FAIL("reply to %s: %s (wanted %s)", cmd, r, want);
    }
    bj_free(r);
}

static void queries_and_errors(void)
{
    BjContext *ctx = new_ctx();
    BjError *err = NULL;
    expect_reply(ctx, "{\"execute\":\"query-jobs\",\"id\":42}", "{\"return\":[],\"id\":42}");
    expect_reply(ctx, "{\"execute\":\"query-version\"}", "\"major\":10");
    expect_reply(ctx, "{\"execute\":\"nope\"}",
                 "{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"The command nope has not been found\"}}");
    expect_reply(ctx, "{\"execute\":\"block-job-pause\",\"arguments\":{\"device\":\"x\"}}",
                 "\"class\":\"DeviceNotActive\",\"desc\":\"Block job 'x' not found\"");
    expect_reply(ctx, "{\"execute\":\"blockdev-del\",\"arguments\":{}}",
                 "\"desc\":\"Parameter 'node-name' is missing\"");
    expect_reply(ctx, "{\"execute\":\"query-jobs\",\"arguments\":{\"x\":1}}",
                 "\"desc\":\"Parameter 'x' is unexpected\"");
    expect_reply(ctx, "{\"execute\":", "JSON parse error");
    expect_reply(ctx, "[]", "QMP input must be a JSON object");
    CHECK(bj_qmp_execute(ctx, NULL, &err) == NULL);
    CHECK(err);
    bj_error_free(&err);
    CHECK(bj_qmp_execute(NULL, "{}", &err) == NULL);
    CHECK(err);
    bj_error_free(&err);
    bj_context_free(&ctx);
}

static void a_mirror_over_qmp(void)
{
    BjContext *ctx = new_ctx();
    Trace t = {0};
    BjEvent *ev;
    int saw_json = 0;
    expect_reply(ctx, "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"null-co\","
                      "\"node-name\":\"src\",\"size\":4194304}}", "{\"return\":{}}");
    expect_reply(ctx, "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"null-co\","
                      "\"node-name\":\"dst\",\"size\":4194304}}", "{\"return\":{}}");
    expect_reply(ctx, "{\"execute\":\"blockdev-mirror\",\"arguments\":{\"job-id\":\"m\","
                      "\"device\":\"src\",\"target\":\"dst\",\"sync\":\"full\"}}", "{\"return\":{}}");
    while ((ev = next_event(ctx, 10000))) {
        int ready = ev->kind == BJ_EVENT_BLOCK_JOB_READY;
        if (ready) {
            saw_json = strstr(ev->json, "\"event\":\"BLOCK_JOB_READY\"") != NULL;
        }
        trace_add(&t, ev);
        bj_event_free(&ev);
        if (ready) {
            break;
        }
    }
    CHECK(saw_json);
    expect_reply(ctx, "{\"execute\":\"query-block-jobs\"}", "\"ready\":true");
    expect_reply(ctx, "{\"execute\":\"block-job-complete\",\"arguments\":{\"device\":\"m\"}}",
                 "{\"return\":{}}");
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:ready READY JSC:waiting JSC:pending "
                      "COMPLETED JSC:concluded JSC:null");
    bj_context_free(&ctx);
}

int main(void)
{
    RUN(queries_and_errors);
    RUN(a_mirror_over_qmp);
    return 0;
}
