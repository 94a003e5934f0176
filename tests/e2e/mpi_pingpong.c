/* mpi_pingpong: a tiny MPI probe for the emulated cluster (tools/emu-cluster.sh).
 *
 * Every rank reports its rank and host name (rank 0 prints them in order),
 * then rank 0 and the last rank play ping-pong for a few message sizes and
 * rank 0 prints one machine-readable line per size:
 *
 *   host rank=R size=N name=HOST
 *   pingpong bytes=B iters=I rtt_us=T bw_MBps=X
 *
 * bw_MBps is one-way bandwidth in 10^6 bytes/s: 2*B*I / elapsed. The other
 * ranks do not take part; they wait for a "done" message with a sleeping
 * poll so they do not steal the (few) cores from the two measuring ranks.
 * It is not a benchmark suite (see bench/ and `mpilm bench`), only a check
 * that ranks land on distinct nodes and that links are shaped as asked.
 *
 * Usage: mpi_pingpong [-t SECONDS_PER_SIZE] [SIZE_BYTES ...]
 *        (default sizes: 1 65536 1048576 4194304; default 0.5 s per size)
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MPI_CHECK(call)                                                       \
    do {                                                                      \
        int rc_ = (call);                                                     \
        if (rc_ != MPI_SUCCESS) {                                             \
            char msg_[MPI_MAX_ERROR_STRING];                                  \
            int len_ = 0;                                                     \
            MPI_Error_string(rc_, msg_, &len_);                               \
            fprintf(stderr, "%s:%d: MPI error: %s\n", __FILE__, __LINE__,     \
                    msg_);                                                    \
            MPI_Abort(MPI_COMM_WORLD, 1);                                     \
        }                                                                     \
    } while (0)

enum { TAG_PING = 1, TAG_PONG = 2, TAG_DONE = 3, MAX_SIZES = 32 };

/* One round trip of `bytes` between me and peer. */
static void round_trip(char *buf, int bytes, int me_first, int peer)
{
    if (me_first) {
        MPI_CHECK(MPI_Send(buf, bytes, MPI_BYTE, peer, TAG_PING, MPI_COMM_WORLD));
        MPI_CHECK(MPI_Recv(buf, bytes, MPI_BYTE, peer, TAG_PONG, MPI_COMM_WORLD,
                           MPI_STATUS_IGNORE));
    } else {
        MPI_CHECK(MPI_Recv(buf, bytes, MPI_BYTE, peer, TAG_PING, MPI_COMM_WORLD,
                           MPI_STATUS_IGNORE));
        MPI_CHECK(MPI_Send(buf, bytes, MPI_BYTE, peer, TAG_PONG, MPI_COMM_WORLD));
    }
}

int main(int argc, char **argv)
{
    int rank = 0, size = 1, rc = 0;
    long sizes[MAX_SIZES] = {1, 65536, 1048576, 4194304};
    int nsizes = 4, user_sizes = 0;
    double per_size_s = 0.5;
    char name[MPI_MAX_PROCESSOR_NAME] = {0}, *names = NULL, *buf = NULL;

    MPI_CHECK(MPI_Init(&argc, &argv));
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size));

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            per_size_s = atof(argv[++i]);
        } else {
            long v = strtol(argv[i], NULL, 10);
            if (v < 1 || v > (1L << 30) || nsizes >= MAX_SIZES) {
                if (rank == 0) fprintf(stderr, "mpi_pingpong: bad size %s\n", argv[i]);
                rc = 2;
                goto done;
            }
            if (!user_sizes) { nsizes = 0; user_sizes = 1; }
            sizes[nsizes++] = v;
        }
    }

    int len = 0;
    MPI_CHECK(MPI_Get_processor_name(name, &len));
    names = calloc((size_t)size, MPI_MAX_PROCESSOR_NAME);
    if (!names) { rc = 1; goto done; }
    MPI_CHECK(MPI_Gather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names,
                         MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0, MPI_COMM_WORLD));
    if (rank == 0) {
        for (int r = 0; r < size; r++)
            printf("host rank=%d size=%d name=%s\n", r, size,
                   names + (size_t)r * MPI_MAX_PROCESSOR_NAME);
        fflush(stdout);
    }

    long maxb = 1;
    for (int i = 0; i < nsizes; i++) if (sizes[i] > maxb) maxb = sizes[i];
    buf = malloc((size_t)maxb);
    if (!buf) { rc = 1; goto done; }
    memset(buf, 0x5a, (size_t)maxb);

    const int last = size - 1;
    if (size > 1 && (rank == 0 || rank == last)) {
        const int peer = rank == 0 ? last : 0;
        for (int s = 0; s < nsizes; s++) {
            int bytes = (int)sizes[s];
            /* warm-up (connection set-up, TCP window growth) */
            for (int w = 0; w < 2; w++) round_trip(buf, bytes, rank == 0, peer);
            /* rank 0 times one more trip and picks the count for ~per_size_s */
            double t0 = MPI_Wtime();
            round_trip(buf, bytes, rank == 0, peer);
            double one = MPI_Wtime() - t0;
            int iters = one > 0 ? (int)(per_size_s / one) : 1000;
            if (iters < 3) iters = 3;
            if (iters > 100000) iters = 100000;
            if (rank == 0)
                MPI_CHECK(MPI_Send(&iters, 1, MPI_INT, peer, TAG_PING, MPI_COMM_WORLD));
            else
                MPI_CHECK(MPI_Recv(&iters, 1, MPI_INT, peer, TAG_PING, MPI_COMM_WORLD,
                                   MPI_STATUS_IGNORE));
            t0 = MPI_Wtime();
            for (int it = 0; it < iters; it++) round_trip(buf, bytes, rank == 0, peer);
            double el = MPI_Wtime() - t0;
            if (rank == 0) {
                printf("pingpong bytes=%d iters=%d rtt_us=%.1f bw_MBps=%.2f\n", bytes,
                       iters, el / iters * 1e6, 2.0 * bytes * iters / el / 1e6);
                fflush(stdout);
            }
        }
        if (rank == 0) /* release the bystanders */
            for (int r = 1; r < last; r++)
                MPI_CHECK(MPI_Send(NULL, 0, MPI_BYTE, r, TAG_DONE, MPI_COMM_WORLD));
    } else if (size > 1) {
        /* bystander: sleep-poll instead of spinning in a blocking receive */
        MPI_Request req;
        int flag = 0;
        MPI_CHECK(MPI_Irecv(NULL, 0, MPI_BYTE, 0, TAG_DONE, MPI_COMM_WORLD, &req));
        while (!flag) {
            MPI_CHECK(MPI_Test(&req, &flag, MPI_STATUS_IGNORE));
            if (!flag) {
                struct timespec ts = {0, 2000000}; /* 2 ms */
                nanosleep(&ts, NULL);
            }
        }
    }

done:
    free(buf);
    free(names);
    if (rc) MPI_Abort(MPI_COMM_WORLD, rc);
    MPI_Finalize();
    return rc;
}
