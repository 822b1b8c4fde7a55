/*
 * The int8 dot-product instruction rate of this CPU: the ceiling no int8 GEMM kernel can pass.
 *
 * benchmarks/peaks.py measures the best rate the int8 GEMM libraries we run on reach (a kernel
 * peak). This times the instruction itself: each thread issues VPDPBUSD (AVX-512 VNNI, u8 x s8
 * -> int32, 4 multiply-accumulates per 32-bit lane) on 12 independent accumulators, with no
 * loads, so nothing but the instruction's throughput limits it. Ops are 2 x multiply-accumulates,
 * as in the profiles.
 *
 * studies/int8_instruction_rate.py compiles and runs it, and writes the result; by hand:
 *
 *   gcc -O2 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -pthread \
 *       studies/int8_instruction_rate.c -o /tmp/int8_rate && /tmp/int8_rate 2 300
 *
 * Arguments: threads (default 1) and millions of rounds per thread and run (default 300, about a
 * second per run here). Prints the best of 3 runs for 512-bit and for 256-bit registers. Needs a
 * CPU with avx512_vnni (see lscpu).
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ACCUMULATORS 12 /* c0 ... c11 below */

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static long rounds; /* per thread and run; ACCUMULATORS instructions each */
static int sink;

/* One thread's instructions: 12 independent accumulators held in registers (named, not an array,
 * which the compiler keeps in memory), each updated once per round. */
#define ISSUE(NAME, VEC, SET1, ZERO, DOT, ADD, LOW128)                                                        \
    static void *NAME(void *unused) {                                                                      \
        (void)unused;                                                                                      \
        VEC a = SET1(3), b = SET1(-5);                                                                     \
        VEC c0 = ZERO(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0,    \
            c10 = c0, c11 = c0;                                                                            \
        for (long round = 0; round < rounds; round++) {                                                    \
            c0 = DOT(c0, a, b); c1 = DOT(c1, a, b); c2 = DOT(c2, a, b); c3 = DOT(c3, a, b);                 \
            c4 = DOT(c4, a, b); c5 = DOT(c5, a, b); c6 = DOT(c6, a, b); c7 = DOT(c7, a, b);                 \
            c8 = DOT(c8, a, b); c9 = DOT(c9, a, b); c10 = DOT(c10, a, b); c11 = DOT(c11, a, b);             \
            /* keeps the loop from being folded into fewer instructions */                                 \
            __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6),   \
                             "+v"(c7), "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));                          \
        }                                                                                                  \
        VEC total = ADD(ADD(ADD(ADD(c0, c1), ADD(c2, c3)), ADD(ADD(c4, c5), ADD(c6, c7))),                 \
                        ADD(ADD(c8, c9), ADD(c10, c11)));                                                  \
        sink += _mm_cvtsi128_si32(LOW128(total));                                                          \
        return NULL;                                                                                       \
    }

ISSUE(issue_512, __m512i, _mm512_set1_epi8, _mm512_setzero_si512, _mm512_dpbusd_epi32, _mm512_add_epi32,
      _mm512_castsi512_si128)
ISSUE(issue_256, __m256i, _mm256_set1_epi8, _mm256_setzero_si256, _mm256_dpbusd_epi32, _mm256_add_epi32,
      _mm256_castsi256_si128)

/* Best GOP/s over 3 runs of `threads` threads, each issuing rounds x ACCUMULATORS instructions. */
static double best_rate(void *(*issue)(void *), int threads, int lanes_bytes) {
    double best = 0.0;
    pthread_t *ids = malloc(sizeof(pthread_t) * (size_t)threads);
    for (int run = 0; run < 3; run++) {
        double start = seconds_now();
        for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, issue, NULL);
        for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
        double elapsed = seconds_now() - start;
        double ops = 2.0 * lanes_bytes * (double)rounds * ACCUMULATORS * threads;
        if (ops / elapsed / 1e9 > best) best = ops / elapsed / 1e9;
    }
    free(ids);
    return best;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    long millions = argc > 2 ? atol(argv[2]) : 300;
    if (threads < 1 || threads > 256 || millions < 1) {
        fprintf(stderr, "usage: %s [THREADS 1-256] [MILLIONS OF ROUNDS >= 1], not %s %s\n", argv[0],
                argc > 1 ? argv[1] : "", argc > 2 ? argv[2] : "");
        return 2;
    }
    rounds = millions * 1000000L;
    printf("VPDPBUSD zmm, %d threads: %.1f GOP/s\n", threads, best_rate(issue_512, threads, 64));
    printf("VPDPBUSD ymm, %d threads: %.1f GOP/s\n", threads, best_rate(issue_256, threads, 32));
    return sink == 42 ? 1 : 0;
}
