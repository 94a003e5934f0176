/* rng: small deterministic random numbers (splitmix64 + xoshiro256**), the
 * same sequence on every machine. State is a value the caller owns, so it can
 * be saved in a checkpoint. Not cryptographic.
 */
#ifndef MPILM_RNG_H
#define MPILM_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} rng_state;

void rng_seed(rng_state *r, uint64_t seed);
uint64_t rng_u64(rng_state *r);
/* uniform in [0, 1) with 24 random bits */
float rng_uniform(rng_state *r);
/* standard normal (Box-Muller, one value per call) */
float rng_normal(rng_state *r);

#endif
