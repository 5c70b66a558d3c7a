// Cold 2-bit GEMV sweeps with different software-prefetch hints / distances vs a plain read loop, in one
// run: the experiment behind the ternary GEMV kernels' prefetch distance (kPrefetchBlocks, prefetch_block).
// The kernel is the engine's AVX-512 VNNI decode loop (T2R4 blocks, bit pairs masked in place).
//
//   g++ -O3 -o /tmp/gemv_prefetch benchmarks/gemv_prefetch.cpp -lpthread && /tmp/gemv_prefetch 1 && /tmp/gemv_prefetch 2
//
// Prints GB/s of packed weights (best of 4 sweeps over 60 matrices of 5632 x 2048, 173 MB) per variant:
// `T0+8` = _MM_HINT_T0 8 blocks (2 KiB) ahead, `T1+16` = _MM_HINT_T1 4 KiB ahead, ...; `read` = AVX2 load-add loop.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
constexpr int64_t kBlock=256;
template<int PF, int HINT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"),noinline)) void gemv(const uint8_t*W,int64_t Kpad,int64_t ng,const int8_t*X,int32_t*out){
 for(int64_t g=0;g<ng;g++){ const uint8_t*Wg=W+g*Kpad;
  __m512i acc[4][4]; for(int r=0;r<4;r++)for(int s=0;s<4;s++)acc[r][s]=_mm512_setzero_si512();
  const __m512i m0=_mm512_set1_epi8(3),m1=_mm512_set1_epi8(12),m2=_mm512_set1_epi8(48),m3=_mm512_set1_epi8((char)192);
  for(int64_t b=0;b<Kpad/kBlock;++b){const int8_t*xb=X+b*kBlock;
    __m512i x0=_mm512_loadu_si512(xb),x1=_mm512_loadu_si512(xb+64),x2=_mm512_loadu_si512(xb+128),x3=_mm512_loadu_si512(xb+192);
    asm("":"+v"(x0),"+v"(x1),"+v"(x2),"+v"(x3));
    if (PF>0) { const char*p=(const char*)(Wg+(b+PF)*kBlock); _mm_prefetch(p,(_mm_hint)HINT);_mm_prefetch(p+64,(_mm_hint)HINT);_mm_prefetch(p+128,(_mm_hint)HINT);_mm_prefetch(p+192,(_mm_hint)HINT);}
    #pragma GCC unroll 4
    for(int r=0;r<4;r++){__m512i v=_mm512_loadu_si512(Wg+b*kBlock+r*64); asm("":"+v"(v));
      acc[r][0]=_mm512_dpbusd_epi32(acc[r][0],_mm512_and_si512(v,m0),x0);
      acc[r][1]=_mm512_dpbusd_epi32(acc[r][1],_mm512_and_si512(v,m1),x1);
      acc[r][2]=_mm512_dpbusd_epi32(acc[r][2],_mm512_and_si512(v,m2),x2);
      acc[r][3]=_mm512_dpbusd_epi32(acc[r][3],_mm512_and_si512(v,m3),x3);}}
  for(int r=0;r<4;r++){ __m512i a=_mm512_add_epi32(acc[r][0],_mm512_srai_epi32(acc[r][1],2)); a=_mm512_add_epi32(a,_mm512_srai_epi32(acc[r][2],4)); a=_mm512_add_epi32(a,_mm512_srai_epi32(acc[r][3],6)); out[g*4+r]=_mm512_reduce_add_epi32(a);}
 }}
__attribute__((target("avx2"),noinline)) uint64_t readloop(const uint8_t*p,size_t n){__m256i a0=_mm256_setzero_si256(),a1=a0,a2=a0,a3=a0;
 for(size_t i=0;i+128<=n;i+=128){a0=_mm256_add_epi64(a0,_mm256_load_si256((const __m256i*)(p+i)));a1=_mm256_add_epi64(a1,_mm256_load_si256((const __m256i*)(p+i+32)));a2=_mm256_add_epi64(a2,_mm256_load_si256((const __m256i*)(p+i+64)));a3=_mm256_add_epi64(a3,_mm256_load_si256((const __m256i*)(p+i+96)));}
 a0=_mm256_add_epi64(_mm256_add_epi64(a0,a1),_mm256_add_epi64(a2,a3)); return _mm256_extract_epi64(a0,0);}
using F=void(*)(const uint8_t*,int64_t,int64_t,const int8_t*,int32_t*);
int main(int argc,char**argv){ int th=atoi(argv[1]); int64_t K=2048, N=5632; int nm=60; size_t mb=N*K/4; 
 uint8_t*W=(uint8_t*)aligned_alloc(4096,mb*nm); memset(W,0x55,mb*nm); int8_t*x=(int8_t*)aligned_alloc(64,K); memset(x,1,K);
 std::vector<int32_t> out(N*2);
 struct V{const char*name;F f;} vs[]={{"nopf",gemv<0,3>},{"T0+8",gemv<8,3>},{"T0+16",gemv<16,3>},{"T0+32",gemv<32,3>},{"T1+16",gemv<16,2>},{"T2+32",gemv<32,1>},{"NTA+16",gemv<16,0>}};
 int nv=sizeof(vs)/sizeof(vs[0]); std::vector<double> best(nv+1,0);
 for(int rep=0;rep<4;rep++){
  for(int v=0;v<=nv;v++){ auto t0=std::chrono::steady_clock::now();
   auto work=[&](int w){ for(int m=0;m<nm;m++){ const uint8_t*Wm=W+m*mb; int64_t G=N/4, g0=G*w/th, g1=G*(w+1)/th;
      if(v<nv) vs[v].f(Wm+g0*K,K,g1-g0,x,out.data()+g0*4); else { volatile uint64_t s=readloop(Wm+g0*K,(g1-g0)*K); (void)s; } } };
   std::vector<std::thread> ts; for(int w=1;w<th;w++) ts.emplace_back(work,w); work(0); for(auto&t:ts)t.join();
   double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count(); best[v]=std::max(best[v],(double)mb*nm/s/1e9);}
 }
 for(int v=0;v<nv;v++) printf("%s %.1f  ",vs[v].name,best[v]); printf("| read %.1f GB/s (%d threads)\n",best[nv],th);
}
