/* ckpt_cmd: `mpilm ckpt ls|latest|verify|inspect`, serial tools over
 * checkpoint directories: rank 0 of comm does the work, the others wait for
 * its exit status. */
#ifndef MPILM_CKPT_CMD_H
#define MPILM_CKPT_CMD_H

#include <mpi.h>

int ckpt_cmd_main(int argc, char **argv, MPI_Comm comm);

#endif
