/*
 * The scenarios of QEMU's tests/unit/test-blockjob.c, in our own code,
 * through the C ABI: job ids, cancel in every status, pause/resume,
 * complete in standby, finalize/dismiss with and without auto.
 */
#include "util.h"

#define MANUAL (BJ_JOB_MANUAL_FINALIZE | BJ_JOB_MANUAL_DISMISS)

static BjContext *ctx;
static char img[512];

static void setup(void)
{
    ctx = new_ctx();
    make_image(img, sizeof(img), "blockjob.img", 1 << 20, 0);
    add_raw(ctx, "node0", img, NULL, 0, 0);
    add_raw(ctx, "node1", img, NULL, 0, 0);
}

static BjJob *mk(const char *id, const char *node, int flags, TestJob *s, BjError **errp)
{
    BjJobDriver d = test_driver();
    return bj_block_job_create(ctx, id, &d, NULL, node, 0, flags, s, errp);
}

static BjJob *started(const char *id, int flags, TestJob *s)
{
    BjError *err = NULL;
    BjJob *job = mk(id, "node0", flags, s, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_start(job, &err));
    CHECK_NO_ERR(err);
    /* Started: running at once (and maybe ready by now). */
    CHECK(bj_job_get_status(job) != BJ_JOB_STATUS_CREATED);
    return job;
}

static void dismiss_and_free(BjJob **job, TestJob *s)
{
    BjError *err = NULL;
    CHECK_INT(bj_job_get_status(*job), BJ_JOB_STATUS_CONCLUDED);
    CHECK(bj_job_dismiss(*job, &err));
    CHECK_NO_ERR(err);
    CHECK_INT(bj_job_get_status(*job), BJ_JOB_STATUS_NULL);
    bj_job_unref(job);
    CHECK(*job == NULL);
    CHECK_INT(s->freed, 1);
}

static void ids_malformed(void)
{
    static const char *bad[] = { "0id", "", "   ", "123", "_id", "-id", ".id", "#id" };
    size_t i;
    discard_events(ctx);
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char msg[64];
        TestJob s;
        BjError *err = NULL;
        memset(&s, 0, sizeof(s));
        CHECK(mk(bad[i], "node0", MANUAL, &s, &err) == NULL);
        snprintf(msg, sizeof(msg), "Invalid job ID '%s'", bad[i]);
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, msg);
        CHECK_INT(s.freed, 1); /* free runs when creation fails */
    }
}

static void ids_default_from_device_name(void)
{
    TestJob s1, s2, s3;
    BjError *err = NULL;
    BjBlockBackendOptions o;
    BjBlockBackend *blk;
    BjJob *j1, *j2;
    char *id;
    discard_events(ctx);
    memset(&s1, 0, sizeof(s1));
    memset(&s2, 0, sizeof(s2));
    memset(&s3, 0, sizeof(s3));
    /* No id and a node without a named backend: the id is "" and invalid. */
    CHECK(mk(NULL, "node1", MANUAL, &s1, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid job ID ''");
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.name = "drive1";
    blk = bj_blk_new(ctx, "node1", &o, &err);
    CHECK_NO_ERR(err);
    j1 = mk(NULL, "node1", MANUAL, &s2, &err);
    CHECK_NO_ERR(err);
    id = bj_job_get_id(j1);
    CHECK_STR(id, "drive1");
    bj_free(id);
    /* A second default id on the same device collides. */
    CHECK(mk(NULL, "node1", MANUAL, &s3, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Job ID 'drive1' already in use");
    /* Two jobs on one node with different ids are fine. */
    j2 = mk("id_2", "node1", MANUAL, &s3, &err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_job_cancel_sync(j1, true), -ECANCELED);
    CHECK_INT(bj_job_cancel_sync(j2, true), -ECANCELED);
    bj_job_unref(&j1);
    bj_job_unref(&j2);
    bj_blk_free(&blk);
    CHECK(blk == NULL);
}

static void ids_duplicate_and_reuse(void)
{
    TestJob s1, s2, s3;
    BjError *err = NULL;
    BjJob *j1, *j3;
    discard_events(ctx);
    memset(&s1, 0, sizeof(s1));
    memset(&s2, 0, sizeof(s2));
    memset(&s3, 0, sizeof(s3));
    j1 = mk("id0", "node0", MANUAL, &s1, &err);
    CHECK_NO_ERR(err);
    CHECK(mk("id0", "node1", MANUAL, &s2, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Job ID 'id0' already in use");
    /* A never-started job that is cancelled frees its id at once. */
    CHECK_INT(bj_job_cancel_sync(j1, true), -ECANCELED);
    CHECK_INT(bj_job_get_status(j1), BJ_JOB_STATUS_NULL);
    j3 = mk("id0", "node0", MANUAL, &s3, &err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_job_cancel_sync(j3, true), -ECANCELED);
    bj_job_unref(&j1);
    bj_job_unref(&j3);
    CHECK_INT(s1.freed + s2.freed + s3.freed, 3);
}

static void ids_internal(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *j;
    BjBlockJobInfo *info;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    CHECK(mk("x", "node0", BJ_JOB_INTERNAL, &s, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Cannot specify job ID for internal job");
    memset(&s, 0, sizeof(s));
    j = mk(NULL, "node0", BJ_JOB_INTERNAL, &s, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_get_id(j) == NULL);
    info = bj_block_job_query(j, &err);
    CHECK(info == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Cannot query QEMU internal jobs");
    CHECK_INT(bj_job_cancel_sync(j, true), -ECANCELED);
    bj_job_unref(&j);
}

static void cancel_created(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    job = mk("Steve", "node0", MANUAL, &s, &err);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_CREATED);
    CHECK_INT(bj_job_cancel_sync(job, true), -ECANCELED);
    /* Never started: dismissed without waiting for dismiss. */
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_NULL);
    trace_drain(ctx, &t, 50);
    CHECK_STR(t.text, "JSC:created JSC:aborting JSC:concluded JSC:null");
    CHECK_STR(s.calls, "abort clean");
    bj_job_unref(&job);
    CHECK_INT(s.freed, 1);
}

static void cancel_running(void)
{
    TestJob s;
    BjJob *job;
    Trace t = { "", 0 };
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    job = started("Steve", MANUAL, &s);
    CHECK_INT(bj_job_cancel_sync(job, false), -ECANCELED);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_CONCLUDED);
    trace_drain(ctx, &t, 50);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:aborting CANCELLED JSC:concluded");
    dismiss_and_free(&job, &s);
}

static void cancel_paused(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    job = started("Steve", MANUAL, &s);
    CHECK(bj_job_user_pause(job, &err));
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PAUSED, 5000));
    /* block-job-cancel without force refuses a paused job... */
    CHECK(!bj_block_job_cancel(job, false, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "The block job for device 'Steve' is currently paused");
    /* ...cancelling resumes it. */
    CHECK_INT(bj_job_cancel_sync(job, false), -ECANCELED);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_CONCLUDED);
    trace_drain(ctx, &(Trace){ "", 0 }, 20);
    dismiss_and_free(&job, &s);
}

static void cancel_ready(void)
{
    TestJob s;
    BjJob *job;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    s.should_converge = 1;
    job = started("Steve", MANUAL, &s);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    CHECK_INT(bj_job_cancel_sync(job, false), -ECANCELED);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_CONCLUDED);
    trace_drain(ctx, &(Trace){ "", 0 }, 20);
    dismiss_and_free(&job, &s);
}

static void cancel_standby(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    s.should_converge = 1;
    job = started("Steve", MANUAL, &s);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    CHECK(bj_job_user_pause(job, &err));
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_STANDBY, 5000));
    CHECK_INT(bj_job_cancel_sync(job, false), -ECANCELED);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_CONCLUDED);
    trace_drain(ctx, &(Trace){ "", 0 }, 20);
    dismiss_and_free(&job, &s);
}

static void cancel_pending(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    s.should_converge = 1;
    job = started("Steve", MANUAL, &s);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    CHECK(bj_job_complete(job, &err));
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PENDING, 5000));
    CHECK_INT(bj_job_cancel_sync(job, false), -ECANCELED);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_CONCLUDED);
    CHECK_STR(s.calls, "abort clean");
    trace_drain(ctx, &(Trace){ "", 0 }, 20);
    dismiss_and_free(&job, &s);
}

static void cancel_concluded(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    s.should_converge = 1;
    job = started("Steve", MANUAL, &s);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    CHECK(bj_job_complete(job, &err));
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PENDING, 5000));
    CHECK(bj_job_finalize(job, &err));
    CHECK_NO_ERR(err);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_CONCLUDED);
    CHECK_STR(s.calls, "prepare commit clean");
    /* cancel is not a verb of concluded... */
    CHECK(!bj_job_user_cancel(job, true, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Job 'Steve' in state 'concluded' cannot accept command verb 'cancel'");
    /* ...but cancel_sync of a concluded job dismisses it, as job_cancel does. */
    CHECK_INT(bj_job_cancel_sync(job, true), 0);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_NULL);
    trace_drain(ctx, &(Trace){ "", 0 }, 20);
    bj_job_unref(&job);
    CHECK_INT(s.freed, 1);
}

static void complete_in_standby(void)
{
    TestJob s;
    BjError *err = NULL;
    BjBlockBackendOptions o;
    BjBlockBackend *blk;
    BjJob *job;
    Trace t = { "", 0 };
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    blk = bj_blk_new(ctx, "node0", &o, &err);
    CHECK_NO_ERR(err);
    s.should_converge = 1;
    job = started("Steve", MANUAL, &s);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    /* A drained section pauses the job: ready -> standby. */
    CHECK(bj_blk_drain_begin(blk, &err));
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_STANDBY, 5000));
    /* complete is accepted in standby; the job finishes after the drain. */
    CHECK(bj_job_complete(job, &err));
    CHECK_NO_ERR(err);
    sleep_ms(20);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_STANDBY);
    CHECK(bj_blk_drain_end(blk, &err));
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PENDING, 5000));
    CHECK(bj_job_finalize(job, &err));
    CHECK_NO_ERR(err);
    trace_drain(ctx, &t, 20);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:ready READY JSC:standby JSC:ready "
                      "JSC:waiting JSC:pending PENDING COMPLETED JSC:concluded");
    dismiss_and_free(&job, &s);
    /* Ending a section that was never begun is an error. */
    CHECK(!bj_blk_drain_end(blk, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Backend '' is not drained");
    bj_blk_free(&blk);
}

static void pause_resume_counting(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    BjBlockJobInfo *info;
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    job = started("Steve", MANUAL, &s);
    CHECK(!bj_job_user_resume(job, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Can't resume a job that was not paused");
    CHECK(bj_job_user_pause(job, &err));
    CHECK(!bj_job_user_pause(job, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Job is already paused");
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PAUSED, 5000));
    info = bj_block_job_query(job, &err);
    CHECK_NO_ERR(err);
    CHECK(info->paused);
    CHECK(!info->busy);
    CHECK_INT(info->status, BJ_JOB_STATUS_PAUSED);
    CHECK_STR(info->device, "Steve");
    CHECK_INT(info->io_status, BJ_BLOCK_DEVICE_IO_STATUS_OK);
    CHECK(info->error == NULL);
    CHECK_INT(info->actively_synced, -1);
    bj_block_job_info_free(&info);
    CHECK(info == NULL);
    CHECK(bj_job_user_resume(job, &err));
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_RUNNING, 5000));
    CHECK(!bj_job_complete(job, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Job 'Steve' in state 'running' cannot accept command verb 'complete'");
    CHECK(!bj_job_finalize(job, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Job 'Steve' in state 'running' cannot accept command verb 'finalize'");
    CHECK(!bj_job_dismiss(job, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Job 'Steve' in state 'running' cannot accept command verb 'dismiss'");
    CHECK_INT(bj_job_cancel_sync(job, true), -ECANCELED);
    trace_drain(ctx, &(Trace){ "", 0 }, 20);
    dismiss_and_free(&job, &s);
}

static void auto_finalize_and_dismiss(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    s.should_converge = 1;
    job = started("auto", 0, &s);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    CHECK_INT(bj_job_complete_sync(job, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_NULL, 5000));
    trace_drain(ctx, &t, 20);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:ready READY JSC:waiting JSC:pending "
                      "COMPLETED JSC:concluded JSC:null");
    CHECK_STR(s.calls, "prepare commit clean");
    bj_job_unref(&job);
    CHECK_INT(s.freed, 1);
}

static void manual_finalize_only(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    s.should_converge = 1;
    job = started("fin", BJ_JOB_MANUAL_FINALIZE, &s);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 5000));
    CHECK(bj_job_complete(job, &err));
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PENDING, 5000));
    CHECK(!bj_job_dismiss(job, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR,
              "Job 'fin' in state 'pending' cannot accept command verb 'dismiss'");
    CHECK(bj_job_finalize(job, &err));
    CHECK_NO_ERR(err);
    CHECK_INT(bj_job_get_status(job), BJ_JOB_STATUS_NULL);
    trace_drain(ctx, &t, 20);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:ready READY JSC:waiting JSC:pending "
                      "PENDING COMPLETED JSC:concluded JSC:null");
    bj_job_unref(&job);
}

static void failure_keeps_error_until_dismiss(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    BjBlockJobInfo *info;
    char *json;
    Trace t = { "", 0 };
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    job = started("bad", MANUAL, &s);
    __atomic_store_n(&s.fail_run, -EIO, __ATOMIC_SEQ_CST);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_CONCLUDED, 5000));
    info = bj_block_job_query(job, &err);
    CHECK_NO_ERR(err);
    CHECK_STR(info->error, "Input/output error");
    bj_block_job_info_free(&info);
    json = bj_query_jobs(ctx, &err);
    CHECK_NO_ERR(err);
    CHECK(strstr(json, "\"error\":\"Input/output error\"") != NULL);
    CHECK(strstr(json, "\"status\":\"concluded\"") != NULL);
    bj_free(json);
    trace_drain(ctx, &t, 20);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:aborting COMPLETED(Input/output error) "
                      "JSC:concluded");
    CHECK_STR(s.calls, "abort clean");
    dismiss_and_free(&job, &s);
}

static void set_speed(void)
{
    TestJob s;
    BjError *err = NULL;
    BjJob *job;
    BjBlockJobInfo *info;
    Trace t = { "", 0 };
    BjJobDriver d = test_driver();
    discard_events(ctx);
    memset(&s, 0, sizeof(s));
    /* A negative speed at creation: created then null, then the error. */
    CHECK(bj_block_job_create(ctx, "spd", &d, NULL, "node0", -1, 0, &s, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Parameter 'speed' expects a non-negative value");
    trace_drain(ctx, &t, 20);
    CHECK_STR(t.text, "JSC:created JSC:null");
    CHECK_INT(s.freed, 1);
    memset(&s, 0, sizeof(s));
    job = started("spd", MANUAL, &s);
    CHECK(bj_block_job_set_speed(job, 8 << 20, &err));
    CHECK_NO_ERR(err);
    info = bj_block_job_query(job, &err);
    CHECK_INT(info->speed, 8 << 20);
    bj_block_job_info_free(&info);
    CHECK(!bj_block_job_set_speed(job, -1, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Parameter 'speed' expects a non-negative value");
    CHECK_INT(bj_job_cancel_sync(job, true), -ECANCELED);
    trace_drain(ctx, &(Trace){ "", 0 }, 20);
    dismiss_and_free(&job, &s);
}

int main(void)
{
    setup();
    RUN(ids_malformed);
    RUN(ids_default_from_device_name);
    RUN(ids_duplicate_and_reuse);
    RUN(ids_internal);
    RUN(cancel_created);
    RUN(cancel_running);
    RUN(cancel_paused);
    RUN(cancel_ready);
    RUN(cancel_standby);
    RUN(cancel_pending);
    RUN(cancel_concluded);
    RUN(complete_in_standby);
    RUN(pause_resume_counting);
    RUN(auto_finalize_and_dismiss);
    RUN(manual_finalize_only);
    RUN(failure_keeps_error_until_dismiss);
    RUN(set_speed);
    bj_context_free(&ctx);
    CHECK(ctx == NULL);
    return 0;
}
