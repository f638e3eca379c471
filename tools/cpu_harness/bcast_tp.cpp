// Throughput of vdpbf16ps / FMA (zmm) fed by 128-bit broadcast loads vs a load + in-register broadcast
// (notes/cpu_decode.md v7). Build: g++ -O2 -march=native bcast_tp.cpp -o bcast_tp
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#define T __attribute__((target("avx512f,avx512bf16,avx512bw"),noinline))
T float bc_mem(long n, const char* p){
  __m512 a[8]; for(int i=0;i<8;++i)a[i]=_mm512_set1_ps(0); __m512bh q=(__m512bh)_mm512_set1_epi32(1);
  for(long k=0;k<n;++k){
#pragma GCC unroll 8
    for(int c=0;c<4;++c)
#pragma GCC unroll 8
    for(int i=0;i<8;++i) a[i]=_mm512_dpbf16_ps(a[i],(__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(p+256*i+16*c))),q);
    __asm__("" : "+r"(p));}
  __m512 s=a[0]; for(int i=1;i<8;++i)s=_mm512_add_ps(s,a[i]); return _mm512_reduce_add_ps(s);}
template<int IMM> T __m512i bc(__m512i x){ return _mm512_shuffle_i32x4(x,x,IMM);} 
T float bc_reg(long n, const char* p){
  __m512 a[8]; for(int i=0;i<8;++i)a[i]=_mm512_set1_ps(0); __m512bh q=(__m512bh)_mm512_set1_epi32(1);
  for(long k=0;k<n;++k){
#pragma GCC unroll 8
    for(int i=0;i<8;++i){ __m512i x=_mm512_loadu_si512(p+256*i);
      a[i]=_mm512_dpbf16_ps(a[i],(__m512bh)_mm512_shuffle_i32x4(x,x,0x00),q);
      a[i]=_mm512_dpbf16_ps(a[i],(__m512bh)_mm512_shuffle_i32x4(x,x,0x55),q);
      a[i]=_mm512_dpbf16_ps(a[i],(__m512bh)_mm512_shuffle_i32x4(x,x,0xAA),q);
      a[i]=_mm512_dpbf16_ps(a[i],(__m512bh)_mm512_shuffle_i32x4(x,x,0xFF),q);}
    __asm__("" : "+r"(p));}
  __m512 s=a[0]; for(int i=1;i<8;++i)s=_mm512_add_ps(s,a[i]); return _mm512_reduce_add_ps(s);}
T float fbc_mem(long n, const char* p){
  __m512 a[8]; for(int i=0;i<8;++i)a[i]=_mm512_set1_ps(0); __m512 q=_mm512_set1_ps(1);
  for(long k=0;k<n;++k){
#pragma GCC unroll 8
    for(int c=0;c<4;++c)
#pragma GCC unroll 8
    for(int i=0;i<8;++i) a[i]=_mm512_fmadd_ps(_mm512_broadcast_f32x4(_mm_loadu_ps((const float*)(p+256*i+16*c))),q,a[i]);
    __asm__("" : "+r"(p));}
  __m512 s=a[0]; for(int i=1;i<8;++i)s=_mm512_add_ps(s,a[i]); return _mm512_reduce_add_ps(s);}
T float dp_reg(long n){
  __m512 a[8]; for(int i=0;i<8;++i)a[i]=_mm512_set1_ps(0); __m512bh q=(__m512bh)_mm512_set1_epi32(1), k=q;
  for(long j=0;j<n;++j){
#pragma GCC unroll 8
    for(int c=0;c<4;++c)
#pragma GCC unroll 8
    for(int i=0;i<8;++i) a[i]=_mm512_dpbf16_ps(a[i],k,q);
    __asm__("" : "+v"(k));}
  __m512 s=a[0]; for(int i=1;i<8;++i)s=_mm512_add_ps(s,a[i]); return _mm512_reduce_add_ps(s);}
int main(){ long n=5000000; alignas(64) static char buf[4096]={};
  auto M=[&](const char* nm, auto f, double ops){ auto t0=std::chrono::steady_clock::now(); volatile float r=f(); auto t1=std::chrono::steady_clock::now(); double s=std::chrono::duration<double>(t1-t0).count(); printf("%s: %.2f Gop/s\n",nm, ops/s/1e9);(void)r;};
  for(int i=0;i<2;++i){M("dp bcast mem",[&]{return bc_mem(n,buf);},32.0*n); M("dp bcast reg",[&]{return bc_reg(n,buf);},32.0*n); M("fma bcast mem",[&]{return fbc_mem(n,buf);},32.0*n); M("dp, no broadcast",[&]{return dp_reg(n);},32.0*n);}
}
