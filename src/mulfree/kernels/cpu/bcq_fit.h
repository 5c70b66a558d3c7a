// The Accuracy-mode ShiftAdd fit of one weight group (bcq_fit.cpp), shared by the per-column entry point and
// the GPTQ column loop (gptq_columns.cpp).
#pragma once
#include <cstdint>

// One group of m weights w (zero where invalid, v = 0.0): level index per weight into idx, and the APoT terms of
// the best iterate's sorted |alpha| into exps / signs [q][terms] (ops/bcq.py bcq_fit_np).
void bcq_fit_group(const double *w, const double *v, int m, int q, int rounds, int terms, int64_t *idx, int8_t *exps,
                   int8_t *signs);
