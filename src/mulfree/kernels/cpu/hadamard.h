// Kernel family 'hadamard' (hadamard.cpp): the online side of randomized Hadamard incoherence, shared
// by its Python binding and the ShiftAdd layer call that applies it around the LUT product.
#pragma once
#include <cstdint>

#include "mulfree_cpu.h"

// y = signs_first ? 2^shift * H_b (D x) : 2^shift * D (H_b x) on rows [rows, n], D = diag(neg ? -1 : 1); y may be
// x (in place). Isa::Scalar runs the plain loops, any other the AVX2 ones (the same result bit for bit); the rows
// are split over `threads` (the shared pool) when there are enough of them.
void hadamard_rows(const float *x, float *y, int64_t rows, int64_t n, const bool *neg, int64_t block, int shift,
                   bool signs_first, Isa isa, int threads);
// std::invalid_argument unless block is a power of two dividing n and the sign mask has n entries.
void check_hadamard(int64_t n, int64_t block, int64_t mask_len);
