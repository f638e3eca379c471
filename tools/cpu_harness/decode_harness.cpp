// Test + timing harness for the native CPU decode: includes csrc/cpu/decode.cpp directly (its internals
// are in an anonymous namespace). Build: tools/cpu_harness/mk.sh. Usage:
//   OMP_NUM_THREADS=2 ./decode_hb                     correctness: 13 shapes x fp32/bf16 x kernel/scalar x
//                                                      clean/NaN-padded caches against a float64 reference
//   BFW=1 ...                                          bf16 through the path without AVX512_BF16 (D 64 / 128)
//   [D=96] ./decode_hb perf HKV PAGED BF16 REPS [B L HQ]  time one case (default B=8 L=4096 HQ=32 D=128) with a
//                                                      parallel memcpy of the same bytes between calls;
//                                                      %copy = kernel bytes/s over memcpy read+write bytes/s
//   NOCOPY=1 ...                                       no memcpy between calls: the data stays in cache
//   PROBE=1 ./decode_hb perf ...                       instead of the kernel, a linear read of the same K and V
//                                                      arrays (32 KB of K, then 32 KB of V; one load and one T1
//                                                      prefetch 16 KB ahead per line): the ceiling for this data
//                                                      on this many threads (contiguous: the kernel's bytes)
//   PYKERNELS_CPU_ISA=avx2 ...                         the tier to run (as for the extension)
#include "cpu/decode.cpp"
#include <chrono>
#include <cstdio>
#include <random>
using namespace pk; using namespace pk::cpu;
static uint16_t tobf(float f){return float_to_bf16(f);}
struct Case{int64_t B,Hq,Hkv,L,D; bool paged; int64_t bs; bool ragged;};
// 64-byte aligned storage for the tensors (attn::AlignedBuf, zero-filled), as torch allocates them: a
// std::vector's large block starts 16 bytes into a page, so every 64-byte row load of the kernel would straddle
// two cache lines (timings up to a quarter low). Misaligned inputs stay covered for correctness by
// portable_harness.cpp (std::vector storage).
template<typename T> class Buf {
 public:
  explicit Buf(size_t n) : n_(n), mem_(n * sizeof(T), true) {}
  T* data() const { return mem_.as<T>(); }
  size_t size() const { return n_; }
  T& operator[](size_t i) const { return data()[i]; }
  T* begin() const { return data(); }
  T* end() const { return data() + n_; }
 private:
  size_t n_;
  attn::AlignedBuf mem_;
};
template<typename T> float ld(const Buf<T>& v, int64_t i);
template<> float ld<float>(const Buf<float>& v, int64_t i){return v[i];}
template<> float ld<uint16_t>(const Buf<uint16_t>& v, int64_t i){return bf16_to_float(v[i]);}
template<typename T> T cv(float f); template<> float cv<float>(float f){return f;} template<> uint16_t cv<uint16_t>(float f){return tobf(f);}
// PROBE=1: K and V read in 32 KB tiles, K then V, each thread a contiguous share of the tiles; one 4-byte load
// per 64-byte line fetches the line (plain C++: the harness also builds without AVX-512).
unsigned linear_probe(const char* K, const char* V, size_t nbytes) {
  const int64_t ntiles = static_cast<int64_t>(nbytes / 32768);
  unsigned total = 0;
#pragma omp parallel reduction(^ : total)
  {
    unsigned acc = 0;
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    for (int64_t t = ntiles * id / nt; t < ntiles * (id + 1) / nt; ++t)
      for (const char* base : {K, V})
        for (size_t i = 0; i < 32768; i += 64) {
          __builtin_prefetch(base + t * 32768 + i + 16384, 0, 2);  // T1
          unsigned x;
          std::memcpy(&x, base + t * 32768 + i, 4);
          acc ^= x;
        }
    total ^= acc;
  }
  return total;
}
template<typename T> double run_case(const Case& c, int mode /*0 dispatch, 1 the portable path*/, bool nanpad, double* secs, int reps){
  std::mt19937 rng(1234); std::normal_distribution<float> nd(0,1);
  std::vector<int32_t> lens(c.B);
  for(int64_t b=0;b<c.B;++b) lens[b]= c.ragged? std::max<int64_t>(1, c.L - (b*c.L)/c.B) : c.L;
  int64_t bs = c.paged? c.bs : c.L, maxb = c.paged? (c.L+bs-1)/bs : 1, nblk;
  std::vector<int32_t> table;
  if(c.paged){ int64_t used=0; for(auto n:lens) used += (n+bs-1)/bs; nblk=used+3; std::vector<int32_t> perm(nblk); for(int i=0;i<nblk;++i)perm[i]=i; std::shuffle(perm.begin(),perm.end(),rng);
    table.assign(c.B*maxb, 0); int64_t pos=0; for(int64_t b=0;b<c.B;++b){int64_t nb=(lens[b]+bs-1)/bs; for(int64_t j=0;j<nb;++j) table[b*maxb+j]=perm[pos++];}}
  else nblk=c.B;
  int64_t csz = nblk*c.Hkv*bs*c.D;
  Buf<T> q(c.B*c.Hq*c.D), k(csz), v(csz), o(c.B*c.Hq*c.D);
  for(auto& x:q) x=cv<T>(nd(rng)); for(auto& x:k) x=cv<T>(nd(rng)); for(auto& x:v) x=cv<T>(nd(rng)+0.5f);
  DecodeParams p{q.data(),k.data(),v.data(),o.data(),lens.data(),c.paged?table.data():nullptr,c.B,c.Hq,c.Hkv,c.D,nblk,bs,maxb,(float)(1.0/std::sqrt((double)c.D)), std::is_same_v<T,float>?DType::f32:DType::bf16};
  // reference (double)
  int64_t g=c.Hq/c.Hkv; std::vector<double> ref(o.size());
  for(int64_t b=0;b<c.B;++b) for(int64_t h=0;h<c.Hq;++h){ int64_t hk=h/g, n=lens[b]; std::vector<double> s(n); double mx=-1e300;
    for(int64_t t=0;t<n;++t){ const T* kr=row_ptr(p,k.data(),b,hk,t); double d=0; for(int64_t x=0;x<c.D;++x) d+= (double)ld(q,(b*c.Hq+h)*c.D+x)*(double)ld(k,kr-k.data()+x); s[t]=d*p.scale; mx=std::max(mx,s[t]);}
    double l=0; for(auto& e:s){e=std::exp(e-mx); l+=e;}
    for(int64_t x=0;x<c.D;++x){double a=0; for(int64_t t=0;t<n;++t){const T* vr=row_ptr(p,v.data(),b,hk,t); a+=s[t]*ld(v,vr-v.data()+x);} ref[(b*c.Hq+h)*c.D+x]=a/l;}}
  if(nanpad){ // poison every row not in a context
    std::vector<char> used(nblk*c.Hkv*bs,0);
    for(int64_t b=0;b<c.B;++b) for(int64_t hk=0;hk<c.Hkv;++hk) for(int64_t t=0;t<lens[b];++t) used[(row_ptr(p,k.data(),b,hk,t)-k.data())/c.D]=1;
    for(int64_t r=0;r<(int64_t)used.size();++r) if(!used[r]) for(int64_t x=0;x<c.D;++x){k[r*c.D+x]=cv<T>(NAN); v[r*c.D+x]=cv<T>(NAN);} }
  const bool probe=getenv("PROBE")!=nullptr, bfw=getenv("BFW")!=nullptr, nocopy=getenv("NOCOPY")!=nullptr;  // read once, outside the timed calls
  auto call=[&]{ if(probe){ volatile unsigned f=linear_probe(reinterpret_cast<const char*>(k.data()), reinterpret_cast<const char*>(v.data()), k.size()*sizeof(T)); (void)f; return; } if constexpr(!std::is_same_v<T,float>){ if(mode==0 && bfw && (c.D==64 || c.D==128)){ if(c.D==128) run_avx512<bf16,Kind::bf16_w,128>(p); else run_avx512<bf16,Kind::bf16_w,64>(p); return;} } if(mode==1) run_portable<std::conditional_t<std::is_same_v<T,float>,float,bf16>>(p); else decode(p);};
  call();
  double err=0, mref=0; for(size_t i=0;i<o.size();++i){ double d=ld(o,i); err=std::max(err,std::fabs(d-ref[i])); mref=std::max(mref,std::fabs(ref[i])); if(std::isnan(d)) err=INFINITY;}
  if(secs){ size_t kvb=0; for(auto n:lens) kvb+=2*(size_t)n*c.Hkv*c.D*sizeof(T);
    std::vector<char> src(kvb,1), dst(kvb,0);
    auto cp=[&]{ 
#pragma omp parallel for
      for(int64_t i=0;i<64;++i) memcpy(dst.data()+kvb/64*i, src.data()+kvb/64*i, kvb/64); };
    cp();
    std::vector<double> rs, tn; for(int r=0;r<reps;++r){
      auto t0=std::chrono::steady_clock::now(); call(); auto t1=std::chrono::steady_clock::now(); if(!nocopy) cp(); auto t2=std::chrono::steady_clock::now();
      double a=std::chrono::duration<double>(t1-t0).count(), b=std::chrono::duration<double>(t2-t1).count();
      rs.push_back((kvb/a)/(2*kvb/b)); tn.push_back(a);}
    std::sort(rs.begin(),rs.end()); std::sort(tn.begin(),tn.end()); secs[0]=tn[tn.size()/2]; secs[1]=rs[rs.size()/2];}
  return err/mref;
}
int main(int argc,char**argv){
  // PYKERNELS_CPU_ISA picks the tier here as it does for the extension (e.g. avx2 on an AVX-512 machine)
  if(const char* e=getenv("PYKERNELS_CPU_ISA"); e && *e){ pk::cpu::Isa t;
    if(!pk::cpu::parse_isa(e,&t)){ fprintf(stderr,"PYKERNELS_CPU_ISA: unknown tier '%s'\n",e); return 2; }
    pk::cpu::set_isa(t); }
  if(argc>1 && std::string(argv[1])=="perf"){
    int64_t hkv=atoi(argv[2]); bool paged=atoi(argv[3]); bool bf=atoi(argv[4]); int reps=argc>5?atoi(argv[5]):20;
    int64_t B=argc>6?atoi(argv[6]):8, L=argc>7?atoi(argv[7]):4096, Hq=argc>8?atoi(argv[8]):32;
    const int64_t D=getenv("D")?atoi(getenv("D")):128;
    Case c{B,Hq,hkv,L,D,paged,16,false}; double s[2];
    double e = bf? run_case<uint16_t>(c,0,false,s,reps) : run_case<float>(c,0,false,s,reps);
    double bytes = (bf?2:4)*(2.0*hkv*D*L*B + 2.0*B*Hq*D);
    printf("hkv%ld paged%d bf%d err %.2e  %.3f ms  %.1f GB/s  %%copy %.0f\n",(long)hkv,paged,bf,e,s[0]*1e3,bytes/s[0]/1e9,100*s[1]); return 0;}
  std::vector<Case> cs={{1,1,1,1,64,false,16,false},{3,8,8,100,128,false,16,true},{4,32,8,1000,128,true,16,true},{2,8,1,65,64,true,7,true},
   {5,16,2,513,128,true,32,true},{1,32,4,4096,128,false,16,false},{2,4,4,3,64,true,1,true},{8,32,32,257,128,true,16,false},{1,32,1,3000,128,true,16,false},
   {1,12,2,1025,64,false,16,false},{2,6,1,700,128,true,5,true},{3,24,3,63,128,false,16,true},{1,1,1,1023,128,true,1,false},
   {2,8,4,300,128,false,16,true},{3,4,2,129,128,true,16,true},  // g = 2 at D = 128: whole-row P.V
   {2,14,2,77,64,true,16,true},  // g = 7: the AVX2 tier's passes of 4, 2 and 1 heads
   {2,6,2,150,80,true,16,true},{1,4,4,600,40,false,16,false}};  // other head dims: the portable path on every tier
  int fails=0;
  for(auto& c:cs) for(int bf=0;bf<2;++bf) for(int mode=0;mode<2;++mode) for(int nan=0;nan<2;++nan){
    double e = bf? run_case<uint16_t>(c,mode,nan,nullptr,0) : run_case<float>(c,mode,nan,nullptr,0);
    double tol = bf? 8e-3 : 1e-5; bool ok = e<=tol; fails+=!ok;
    if(!ok || getenv("V")) printf("%s B%ld Hq%ld Hkv%ld L%ld D%ld paged%d bs%ld rag%d bf%d mode%d nan%d err %.3e\n", ok?"ok  ":"FAIL",(long)c.B,(long)c.Hq,(long)c.Hkv,(long)c.L,(long)c.D,c.paged,(long)c.bs,c.ragged,bf,mode,nan,e);
  }
  printf("fails %d\n",fails); return fails!=0;
}
