/* A C host: a job of its own over blkdebug, events as QMP JSON lines. */
#include <poll.h>
#include <stdio.h>
#include "blockjob.h"

static int run(BjJob *job, void *opaque, BjError **errp) /* the job's thread */
{
    static char buf[65536];
    for (int64_t off = 0; off < 1 << 20;) {
        bj_job_pause_point(job);               /* pauses (and stops) happen here */
        if (bj_job_is_cancelled(job))
            return 0;
        int r = bj_node_pwrite(opaque, off, buf, sizeof buf, NULL);
        if (r < 0 && bj_block_job_error_action(job, BJ_BLOCKDEV_ON_ERROR_ENOSPC, false, -r,
                                               errp) == BJ_BLOCK_ERROR_ACTION_REPORT)
            return r;                          /* report: the job fails */
        if (r == 0) {                          /* stop: retried after resume */
            off += sizeof buf;
            bj_job_progress_update(job, sizeof buf);
        }
    }
    return 0;
}

int main(void)
{
    BjError *err = NULL;
    BjContext *ctx = bj_context_new(&err);
    int fd = bj_event_queue_enable(ctx, &err), done = 0;
    bj_blockdev_add(ctx, "{\"driver\":\"raw\",\"node-name\":\"disk\",\"file\":{\"driver\":"
                         "\"blkdebug\",\"image\":{\"driver\":\"null-co\",\"size\":1048576},"
                         "\"inject-error\":[{\"event\":\"write_aio\",\"errno\":28,\"once\":true}]}}",
                    &err);
    BjNode *disk = bj_node_find(ctx, "disk", &err);
    BjJobDriver drv = { .size = sizeof drv, .job_type = BJ_JOB_TYPE_BACKUP, .run = run };
    BjJob *job = bj_block_job_create(ctx, "job0", &drv, NULL, "disk", 0, 0, disk, &err);
    if (err || !bj_job_start(job, &err)) {
        fprintf(stderr, "error: %s\n", bj_error_get_pretty(err));
        return 1;
    }
    while (!done) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        poll(&p, 1, -1);
        bj_event_queue_ack(ctx);
        for (BjEvent *ev; (ev = bj_event_next(ctx)); bj_event_free(&ev)) {
            printf("%s\n", ev->json);
            if (ev->kind == BJ_EVENT_JOB_STATUS_CHANGE && ev->status == BJ_JOB_STATUS_PAUSED)
                bj_job_user_resume(job, NULL);  /* e.g. after freeing space */
            done |= ev->kind == BJ_EVENT_JOB_STATUS_CHANGE && ev->status == BJ_JOB_STATUS_NULL;
        }
    }
    bj_job_unref(&job);
    bj_node_unref(&disk);
    bj_context_free(&ctx);
    return 0;
}
