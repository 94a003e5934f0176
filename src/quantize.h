/* quantize: `mpilm quantize --ckpt CKPT --out OUT --format q8|q4|q4a|nf4|auto`
 * (issue 7). Ranks divide the model's tensors by size (greedy, largest first
 * to the least loaded rank: deterministic for a rank count), each reads and
 * verifies only its tensors, quantizes the linear weights with
 * kernels/quant.h, and all write the quantized checkpoint collectively
 * (io/qckpt.h). Rank 0 reports per-tensor format, bits and error, the size
 * before and after and, with --eval, loss, perplexity, KL divergence and
 * top-1 agreement of the fp32 and quantized models.
 * Not here: the block formats (kernels/quant.h), the file layout (io/qckpt).
 */
#ifndef MPILM_QUANTIZE_H
#define MPILM_QUANTIZE_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

/* Collective over comm. 0, 1 (error) or 2 (usage). */
int quantize_main(int argc, char **argv, MPI_Comm comm);

/* Deterministic balanced assignment of n items of the given sizes to p
 * ranks: largest first (ties: lower index) to the least loaded rank (ties:
 * lower rank). owner[i] gets the rank of item i. */
void quantize_assign(const uint64_t *size, int n, int p, int *owner);

#endif
