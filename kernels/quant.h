/* Block quantization of weight matrices and matmul kernels that read the
 * quantized blocks directly (serving). Used by `mpilm quantize` (encode,
 * error report, format choice) and `mpilm serve` (quant_matmul).
 * Not here: the HDF5 layout of quantized checkpoints (io/) and the choice of
 * which tensors to quantize (src/ quantizer driver).
 *
 * Weights are [rows=out, cols=in] row-major, as torch.nn.Linear. Each row is
 * cut into blocks of QUANT_BLOCK = 32 consecutive weights along `in`; a row
 * has nblk = ceil(cols / 32) blocks. When cols is not a multiple of 32 the
 * last block of every row is padded with zeros: the scale search fits only
 * the valid weights, the padding positions store the code nearest to 0, and
 * dequant_tensor / quant_matmul never read them back (x is taken as 0 there).
 *
 * Formats (per block of 32 weights; scales and minimums are IEEE binary16):
 *   q8   symmetric int8, codes -127..127, one fp16 scale d: w = d*q.
 *        8.5 bits/weight. Guarantee: |w - x| <= absmax(block)/254 (half a
 *        step of absmax/127) for every weight of a block with absmax >= 2e-3
 *        (below that the subnormal fp16 scale is too coarse for it; such
 *        blocks are coded with the least squared error instead).
 *   q4   symmetric int4, codes -8..7 (the full two's-complement range; the
 *        scale may be negative, so the largest-magnitude weight can land on
 *        -8 or on +7), one fp16 scale: w = d*q. 4.5 bits/weight.
 *   q4a  asymmetric int4, codes 0..15, fp16 scale d and fp16 minimum m:
 *        w = d*q + m (one rounding: d*q is exact, fused or not).
 *        5 bits/weight.
 *   nf4  4-bit NormalFloat (QLoRA): code k selects quant_nf4_codebook[k],
 *        the 16 normal-distribution quantiles scaled to [-1, 1]; one fp16
 *        scale (absmax-like, may be negative to flip the asymmetric
 *        codebook): w = d*cb[k]. 4.5 bits/weight.
 *
 * Rounding: for every block the encoder evaluates candidate parameters and
 * keeps the one with the least squared error over the block, measured with
 * the parameters as stored (fp16) and the nearest code of each weight
 * (x*(1/d), or (x-m)*(1/d), rounded to nearest even and clamped):
 *   q8   every fp16 scale in about [absmax/127.5, absmax/127] (outside it
 *        the half-step bound cannot hold) plus a least-squares refit;
 *   q4   absmax mapped onto -8 and onto +7, and a grid of 8 factors
 *        0.62..1.04 on each, every grid point refitted by least squares;
 *   nf4  absmax (QLoRA), then the same grid for both signs of the scale;
 *   q4a  (max-min)/15 with m = min, then the grid anchored at the top and at
 *        the bottom, every point refitted twice by joint least squares of
 *        (d, m) given its codes.
 * The plain absmax choice is always a candidate, so the result is never
 * worse than it (on Gaussian weights the squared error is 7% (q8) to 20-25%
 * (q4a, nf4) lower). The encoder uses a fixed evaluation order, no FMA
 * contraction, and its AVX2 and scalar paths do the same IEEE operations:
 * the same input gives the same bytes on any machine, compiler (gcc,
 * clang, -O0..-O3) and thread count. Speed, one core: ~60 M weights/s
 * (q8), ~20 (q4, nf4), ~12 (q4a).
 *
 * Tensor buffer layout (planar, so a checkpoint can store each part as its
 * own dataset /qmodel/<name>/{q,scale,min}); see quant_layout_of():
 *   q     [rows][nblk][32] int8 (q8)  or  [rows][nblk][16] uint8 (4-bit):
 *         byte j of a 4-bit block holds weight j in its low nibble and weight
 *         j+16 in its high nibble; q4 nibbles are the code + 8 (0..15).
 *   scale [rows][nblk] fp16 bits (uint16, host byte order = little endian)
 *   min   [rows][nblk] fp16 bits, q4a only
 * The parts follow each other in that order without gaps; the buffer needs
 * no particular alignment.
 *
 * Error codes: 0 on success, -EINVAL (bad format/argument, non-finite
 * weight), -ERANGE (a block's plain absmax scale, or its minimum, does not
 * fit fp16: |w| beyond ~8.3e6 (q8), 5.2e5 (q4), 6.5e4 (nf4)), -ENOMEM.
 */
#ifndef MPILM_KERNELS_QUANT_H
#define MPILM_KERNELS_QUANT_H

#include <stddef.h>
#include <stdint.h>

#define QUANT_BLOCK 32

typedef enum { QUANT_Q8 = 0, QUANT_Q4 = 1, QUANT_Q4A = 2, QUANT_NF4 = 3, QUANT_NFMT } quant_fmt;

/* NF4 code values, increasing; index 7 is exactly 0. */
extern const float quant_nf4_codebook[16];

/* "q8", "q4", "q4a", "nf4"; NULL for an invalid format. */
const char *quant_fmt_name(quant_fmt f);
/* Name -> format. 0, or -EINVAL for an unknown name. */
int quant_fmt_from_name(const char *name, quant_fmt *out);
/* Bytes of one block: codes + fp16 scale (+ fp16 min). 0 for a bad format. */
size_t quant_block_bytes(quant_fmt f);
/* Bits per weight including scales (8.5, 4.5, 5.0, 4.5). */
double quant_bits_per_weight(quant_fmt f);

typedef struct {
    size_t nblk;       /* blocks per row = ceil(cols / 32) */
    size_t code_bytes; /* bytes of codes per block: 32 (q8) or 16 */
    size_t q_off, q_bytes;
    size_t scale_off, scale_bytes;
    size_t min_off, min_bytes; /* min_bytes == 0 unless q4a */
    size_t total;              /* bytes of the whole buffer */
} quant_layout;

/* Layout of the buffer for a [rows, cols] tensor. 0 or -EINVAL. */
int quant_layout_of(quant_fmt f, size_t rows, size_t cols, quant_layout *l);
/* Convenience: total buffer bytes, 0 for a bad format. */
size_t quant_tensor_bytes(quant_fmt f, size_t rows, size_t cols);

/* Quantize w (rows, cols) into out (quant_tensor_bytes bytes). OpenMP over
 * rows; deterministic. */
int quant_tensor(quant_fmt f, const float *w, size_t rows, size_t cols, void *out);
/* Dequantize q into w (rows, cols). OpenMP over rows. */
int dequant_tensor(quant_fmt f, const void *q, size_t rows, size_t cols, float *w);

/* ||ref - approx||_2 / ||ref||_2, accumulated in double (0 if both are 0). */
double quant_rel_rmse(const float *ref, const float *approx, size_t n);

/* y (B, out) = x (B, in) @ W^T (+ bias (out), may be NULL), W (out, in) in
 * format f, read block by block without a dequantized copy (kernels/cpu/
 * quant_dot.c). Each row of x is quantized per block of 32 to int8 (scale
 * dx = absmax/127, round to nearest) and every weight block is an exact
 * integer dot product with it, scaled once per block (as llama.cpp does).
 * Numerics, per output y[b,r] with the dequantized weights w and per block
 * j of the row: |y - sum w x| <= sum_j (dx_j/2) sum_{i in j} |w_i|
 *   (+ nf4 only: sum_j |d_j| (0.5/127) sum_{i in j} |xq_i dx_j|, the int8
 *   rounding of the codebook) + fp32 rounding (~1e-6 of sum |w x|).
 * Allocates the packed x (about B*in*1.25 bytes). Meant for decode-sized B
 * (1..32) but correct for any B. OpenMP over output rows; each y element is
 * computed by the same instruction sequence whatever the thread count and
 * the other rows of x, so results are bitwise independent of both (for one
 * ISA). Uses quant_isa_best(). */
int quant_matmul(quant_fmt f, const void *wq, size_t out, size_t in, const float *x, size_t B,
                 const float *bias, float *y);

/* Kernel instruction sets: AUTO = the best this CPU runs; SCALAR = the
 * exact reference (quant_matmul_ref); AVX2 (x86-64-v3: vpmaddubsw) and
 * AVX512VNNI (vpdpbusd, chosen at run time with a CPU check). */
typedef enum {
    QUANT_ISA_AUTO = 0,
    QUANT_ISA_SCALAR,
    QUANT_ISA_AVX2,
    QUANT_ISA_AVX512VNNI
} quant_isa;
quant_isa quant_isa_best(void);
const char *quant_isa_name(quant_isa isa);
/* quant_matmul with a given ISA: -ENOTSUP when this CPU or build lacks it
 * (the tests run every available one). */
int quant_matmul_isa(quant_fmt f, quant_isa isa, const void *wq, size_t out, size_t in,
                     const float *x, size_t B, const float *bias, float *y);
/* Exact portable scalar reference: float matmul on the dequantized weights
 * (single thread, sequential fp32 sum per output). */
int quant_matmul_ref(quant_fmt f, const void *wq, size_t out, size_t in, const float *x, size_t B,
                     const float *bias, float *y);

/* IEEE binary16 <-> binary32, round to nearest even; overflow -> inf,
 * NaN stays NaN (quiet, top payload bits kept), subnormals exact. */
uint16_t quant_fp32_to_fp16(float f);
float quant_fp16_to_fp32(uint16_t h);

#endif
