/* ckpt_cmd: `mpilm ckpt ls|latest|verify|inspect`, serial tools over
 * checkpoint directories (no MPI). */
#ifndef MPILM_CKPT_CMD_H
#define MPILM_CKPT_CMD_H

int ckpt_cmd_main(int argc, char **argv);

#endif
