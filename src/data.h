/* data: `mpilm data prepare` (byte tokenizer over files and directories) and
 * the batch layout of DESIGN.md section 5: a micro-batch of B rows of T tokens
 * is B*T+1 consecutive tokens (inputs, and targets shifted by one), batches
 * following each other from the start of the split.
 * Not here: the token file format itself (io/tokfile).
 */
#ifndef MPILM_DATA_H
#define MPILM_DATA_H

#include "io/tokfile.h"

#include <stdint.h>

int data_prepare_main(int argc, char **argv);

/* Number of whole batches of `rows` x T in the split (0 if it is too small). */
uint64_t data_num_batches(const tokfile *tf, int rows, int T);
/* Reads rows x T inputs and targets starting at token `first`. */
void data_read_rows(const tokfile *tf, uint64_t first, int rows, int T, int *inp, int *tgt);

#endif
