#!/usr/bin/env python3
"""Time LMDeploy 0.14.0's PyTorch-engine Triton kernel ``fill_kv_cache``.

Case: prefill of 8 sequences x 2048 new tokens (16384 tokens), 8 KV heads,
head dim 128 (K and V), bf16 inputs, page size 64, FP8 e4m3 KV cache with
per-tensor scales (k_scale=0.15, v_scale=0.05), layout 'bshd', sequence b owns
blocks b*32 .. b*32+31, kv_seq_length == q_seq_length == 2048.

The kernel is imported from the ``lmdeploy`` tree next to this file, which
``benches/peers/lmdeploy_setup.sh WHEEL`` builds in target/whl-lmd/: LMDeploy's
fill_kv_cache.py / turbo_quant.py taken unchanged from the wheel (Apache-2.0,
OpenMMLab), with stand-in package __init__ files so that only torch + triton are
needed. The script checks the sha256 of the imported kernel file against the
wheel's copy.

The call mirrors what LMDeploy's CUDA attention backend does
(lmdeploy/pytorch/backends/cuda/attention/default.py::_fill_kv_cache_impl and
lmdeploy/pytorch/nn/attention.py for FP8):
    fill_kv_cache(k, v, k_cache, v_cache, q_start_loc, q_seqlens,
                  kv_seq_length=kv_seqlens, max_q_seq_length=2048,
                  block_offsets=block_offsets,
                  k_scales_zeros=k_scale, v_scales_zeros=v_scale,   # 0-d fp32 cuda tensors
                  quant_policy=QuantPolicy.FP8,                      # == 16
                  kv_layout='bshd')   # cache shape [num_blocks, 64, 8, 128]

Usage (GPU):  cd target/whl-lmd && python3 lmdeploy_fill.py
Local smoke test without a GPU (Triton interpreter, tiny shape):
    TRITON_INTERPRET=1 python3 lmdeploy_fill.py --device cpu --batch 2 --seqlen 128 --check-only
"""
import argparse
import hashlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The stub `lmdeploy` package next to this script must win over any installed lmdeploy.
sys.path.insert(0, HERE)
os.environ.setdefault('TRITON_CACHE_DIR', '/tmp/triton-cache-lmdeploy-fill')

import torch  # noqa: E402
import triton  # noqa: E402

import lmdeploy  # noqa: E402
from lmdeploy.messages import QuantPolicy  # noqa: E402
from lmdeploy.pytorch.kernels.cuda import fill_kv_cache as fkc_mod  # noqa: E402
from lmdeploy.pytorch.kernels.cuda.fill_kv_cache import fill_kv_cache  # noqa: E402

# sha256 of lmdeploy/pytorch/kernels/cuda/fill_kv_cache.py inside
# lmdeploy-0.14.0-cp312-cp312-manylinux2014_x86_64.whl
WHEEL_FILL_KV_CACHE_SHA256 = '2dc7f687c531bd2c37b49fd97dfacb30af0ca721a20232e1523e73a3eba858d0'

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0 ** -6


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seqlen', type=int, default=2048)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--head-dim', type=int, default=128)
    p.add_argument('--page', type=int, default=64)
    p.add_argument('--k-scale', type=float, default=0.15)
    p.add_argument('--v-scale', type=float, default=0.05)
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--iters', type=int, default=200)
    p.add_argument('--bursts', type=int, default=10)
    p.add_argument('--burst-len', type=int, default=50)
    p.add_argument('--device', default='cuda')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--check-only', action='store_true', help='correctness checks only, no timing')
    p.add_argument('--no-sleep-pad', action='store_true',
                   help='do not enqueue torch.cuda._sleep before each single-call event pair '
                   '(then host launch latency can leak into the single-call numbers)')
    p.add_argument('--sleep-cycles', type=int, default=1_000_000)
    p.add_argument('--no-graph', action='store_true', help='skip the CUDA-graph burst measurement')
    p.add_argument('--skip-bf16', action='store_true', help='skip the quant_policy=0 (bf16 cache) line')
    p.add_argument('--skip-copy', action='store_true', help='skip the torch copy_ reference lines')
    return p.parse_args()


def sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_single(fn, iters, sleep_pad, sleep_cycles):
    """Median of `iters` single calls, one CUDA event pair per call (us)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        if sleep_pad:
            # Keep the GPU busy while the host enqueues start-event + kernel, so the
            # event pair brackets only device time, not Python/Triton launch latency.
            torch.cuda._sleep(sleep_cycles)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return statistics.median(times), min(times)


def time_burst(fn, bursts, burst_len):
    """Median over `bursts` of (elapsed of `burst_len` back-to-back calls) / burst_len (us)."""
    per_call = []
    for _ in range(bursts):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        for _ in range(burst_len):
            fn()
        e.record()
        torch.cuda.synchronize()
        per_call.append(s.elapsed_time(e) * 1e3 / burst_len)
    return statistics.median(per_call)


def time_host(fn, n):
    """Host wall time per call of `n` back-to-back calls incl. final sync (us)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n


def time_graph(fn, bursts, burst_len):
    """Capture `burst_len` calls in one CUDA graph; median over `bursts` replays, per call (us).
    Removes host launch overhead entirely (pure device time of back-to-back kernels)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(burst_len):
            fn()
    g.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(bursts):
        st = torch.cuda.Event(enable_timing=True)
        en = torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        torch.cuda.synchronize()
        per_call.append(st.elapsed_time(en) * 1e3 / burst_len)
    del g
    return statistics.median(per_call)


def report(label, fn, nbytes, args, extra=''):
    for _ in range(args.warmup):
        fn()
    torch.cuda.synchronize()
    med, mn = time_single(fn, args.iters, not args.no_sleep_pad, args.sleep_cycles)
    burst = time_burst(fn, args.bursts, args.burst_len)
    host = time_host(fn, args.burst_len)
    graph = None
    if not args.no_graph:
        try:
            graph = time_graph(fn, args.bursts, args.burst_len)
        except Exception as e:  # graph capture is an extra; never fail the run for it
            print(f'  [{label}] CUDA graph timing failed: {type(e).__name__}: {e}')
            torch.cuda.synchronize()
    gbps = nbytes / (burst * 1e-6) / 1e9
    gbps_ev = nbytes / (med * 1e-6) / 1e9
    print(f'{label}: median {med:.2f} us (events), {burst:.2f} us (burst mean), {gbps:.1f} GB/s{extra}')
    g_txt = f', graph-burst mean {graph:.2f} us ({nbytes / (graph * 1e-6) / 1e9:.1f} GB/s)' if graph else ''
    print(f'    detail: events min {mn:.2f} us, events-median BW {gbps_ev:.1f} GB/s, '
          f'host wall/call {host:.2f} us{g_txt}; bytes moved {nbytes} ({nbytes / 2**20:.1f} MiB)')
    sys.stdout.flush()
    return med, burst, graph


# ----------------------------------------------------------------------------- setup

def make_inputs(args, device):
    B, L, H, D, P = args.batch, args.seqlen, args.heads, args.head_dim, args.page
    assert L % P == 0
    nblk_per_seq = L // P
    ntok = B * L
    g = torch.Generator(device='cpu').manual_seed(args.seed)
    k = (torch.randn(ntok, H, D, generator=g) * 1.0).to(torch.bfloat16).to(device)
    v = (torch.randn(ntok, H, D, generator=g) * 1.0).to(torch.bfloat16).to(device)
    # LMDeploy engine dtypes: q_seqlens/q_start_loc/kv_seqlens int64, block_offsets int32.
    q_seqlens = torch.full((B, ), L, dtype=torch.int64, device=device)
    q_start_loc = q_seqlens.cumsum(0) - q_seqlens
    kv_seqlens = q_seqlens.clone()  # no history
    block_offsets = torch.arange(B * nblk_per_seq, dtype=torch.int32, device=device).view(B, nblk_per_seq)
    num_blocks = B * nblk_per_seq
    return dict(k=k, v=v, q_seqlens=q_seqlens, q_start_loc=q_start_loc, kv_seqlens=kv_seqlens,
                block_offsets=block_offsets, num_blocks=num_blocks)


def alloc_cache(inp, args, dtype, device):
    # kv_layout 'bshd': [num_blocks, block_size, num_kv_heads, head_dim] (LMDeploy CUDA backend shape)
    shape = (inp['num_blocks'], args.page, args.heads, args.head_dim)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def call(inp, k, v, kc, vc, ks, vs, policy, args):
    fill_kv_cache(k, v, kc, vc,
                  inp['q_start_loc'], inp['q_seqlens'],
                  kv_seq_length=inp['kv_seqlens'],
                  max_q_seq_length=args.seqlen,
                  block_offsets=inp['block_offsets'],
                  k_scales_zeros=ks, v_scales_zeros=vs,
                  quant_policy=policy,
                  kv_layout='bshd')


def gather_tokens(cache, block_offsets, ntok):
    """Read the cache back in token order: [ntok, H, D]."""
    blocks = cache[block_offsets.flatten().long()]  # [B*nblk, P, H, D]
    return blocks.reshape(-1, cache.size(2), cache.size(3))[:ntok]


# ----------------------------------------------------------------------------- checks

def check_fp8(inp, args, device):
    ok = True
    k, v = inp['k'], inp['v']
    ntok = k.size(0)
    ks = torch.tensor(args.k_scale, dtype=torch.float32, device=device)  # 0-d, like nn/attention.py
    vs = torch.tensor(args.v_scale, dtype=torch.float32, device=device)
    kc, vc = alloc_cache(inp, args, torch.float8_e4m3fn, device)
    # Pre-fill with 0x7F (NaN in e4m3fn) to prove every slot gets written.
    kc.view(torch.uint8).fill_(0x7F)
    vc.view(torch.uint8).fill_(0x7F)
    call(inp, k, v, kc, vc, ks, vs, QuantPolicy.FP8, args)
    _sync(device)
    for name, x, c, s in (('K', k, kc, args.k_scale), ('V', v, vc, args.v_scale)):
        got = gather_tokens(c, inp['block_offsets'], ntok)
        nan_left = torch.isnan(got.float()).sum().item()
        # torch reference of the same math: fp32 x / scale, clamp to +-448, RNE cast to e4m3
        ref = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        same = (got.view(torch.uint8) == ref.view(torch.uint8)).float().mean().item()
        deq = got.float() * s
        xf = x.float()
        err = (deq - xf).abs()
        normal = (xf.abs() / s) >= E4M3_MIN_NORMAL
        max_rel = (err[normal] / xf.abs()[normal]).max().item() if normal.any() else float('nan')
        rel_fro = (err.norm() / xf.norm()).item()
        max_abs = err.max().item()
        # e4m3 has 3 mantissa bits: half-ulp relative error <= 2^-4 in the normal range
        good = nan_left == 0 and max_rel <= 2.0 ** -4 * 1.001 and same > 0.999
        ok &= good
        print(f'  check {name} (scale {s}): unwritten(NaN) slots {nan_left}, bytes equal to torch ref {same * 100:.4f}%, '
              f'max rel err (|x/s|>=2^-6) {max_rel:.4g} (bound 2^-4=0.0625), rel fro err {rel_fro:.4g}, '
              f'max abs err {max_abs:.4g} -> {"OK" if good else "MISMATCH"}')
        # spot-check a few blocks explicitly (first/last block of a few sequences)
        for b in sorted({0, args.batch // 2, args.batch - 1}):
            for j in (0, args.seqlen // args.page - 1):
                blk = inp['block_offsets'][b, j].item()
                t0 = b * args.seqlen + j * args.page
                d = c[blk].float() * s
                r = x[t0:t0 + args.page].float()
                e = ((d - r).abs() / r.abs().clamp_min(E4M3_MIN_NORMAL * s)).max().item()
                if e > 2.0 ** -4 * 1.001:
                    ok = False
                    print(f'    block seq{b}/page{j} (cache block {blk}): max rel err {e:.4g} MISMATCH')
        print(f'    spot-checked blocks of seqs {sorted({0, args.batch // 2, args.batch - 1})}, pages first/last')

    # Saturation: inject out-of-range values (incl. inf) into a copy; expect +-448 in cache.
    k2, v2 = k.clone(), v.clone()
    H_, D_ = args.heads, args.head_dim
    pos = [(0, 0, 0), (1, 1 % H_, 5 % D_), (ntok - 1, H_ - 1, D_ - 1), (ntok // 2, 3 % H_, (D_ // 2) % D_)]
    kvals = [1000.0, -1000.0, float('inf'), 70.0]      # 70/0.15 = 466.7 > 448
    vvals = [-50.0, 23.0, float('-inf'), 1e4]           # 23/0.05 = 460 > 448
    for (t, h, d), kv_, vv_ in zip(pos, kvals, vvals):
        k2[t, h, d] = kv_
        v2[t, h, d] = vv_
    kc.view(torch.uint8).fill_(0x7F)
    vc.view(torch.uint8).fill_(0x7F)
    call(inp, k2, v2, kc, vc, ks, vs, QuantPolicy.FP8, args)
    _sync(device)
    gk = gather_tokens(kc, inp['block_offsets'], ntok).float()
    gv = gather_tokens(vc, inp['block_offsets'], ntok).float()
    sat = []
    for (t, h, d), kv_, vv_ in zip(pos, kvals, vvals):
        sat.append((gk[t, h, d].item(), 448.0 if kv_ > 0 else -448.0))
        sat.append((gv[t, h, d].item(), 448.0 if vv_ > 0 else -448.0))
    sat_ok = all(g_ == e_ for g_, e_ in sat)
    ok &= sat_ok
    print(f'  saturation check (values beyond +-448*scale, incl. +-inf): got {[g_ for g_, _ in sat]} '
          f'-> {"saturated to +-448 OK" if sat_ok else "NOT saturated"}')
    return ok


def check_bf16(inp, args, device):
    kc, vc = alloc_cache(inp, args, torch.bfloat16, device)
    kc.fill_(float('nan'))
    vc.fill_(float('nan'))
    call(inp, inp['k'], inp['v'], kc, vc, None, None, QuantPolicy.NONE, args)
    _sync(device)
    ntok = inp['k'].size(0)
    okk = torch.equal(gather_tokens(kc, inp['block_offsets'], ntok), inp['k'])
    okv = torch.equal(gather_tokens(vc, inp['block_offsets'], ntok), inp['v'])
    print(f'  check bf16 cache (quant_policy 0): K exact {okk}, V exact {okv}')
    return okk and okv


# ----------------------------------------------------------------------------- main

def main():
    args = parse_args()
    device = torch.device(args.device)
    kfile = os.path.abspath(fkc_mod.__file__)
    ksha = sha256_file(kfile)
    print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, '
          f'lmdeploy stub {lmdeploy.__version__} from {os.path.dirname(os.path.abspath(lmdeploy.__file__))}')
    print(f'kernel file {kfile}\n  sha256 {ksha} '
          f'({"== wheel 0.14.0 copy" if ksha == WHEEL_FILL_KV_CACHE_SHA256 else "!= WHEEL COPY"})')
    if not kfile.startswith(HERE):
        print('WARNING: fill_kv_cache was not imported from the directory of this script')
    if device.type == 'cuda':
        print(f'device {torch.cuda.get_device_name(device)}, TRITON_CACHE_DIR={os.environ.get("TRITON_CACHE_DIR")}')
    print(f'shape: batch {args.batch} x {args.seqlen} tokens, kv heads {args.heads}, head dim {args.head_dim}, '
          f'page {args.page}, quant_policy FP8={int(QuantPolicy.FP8)} (float8_e4m3fn), '
          f'k_scale {args.k_scale}, v_scale {args.v_scale}, kv_layout bshd')

    inp = make_inputs(args, device)
    ok = check_fp8(inp, args, device)
    if not args.skip_bf16:
        ok &= check_bf16(inp, args, device)
    print(f'correctness: {"PASS" if ok else "FAIL"}')
    if os.environ.get('TRITON_INTERPRET') == '1':
        print('  note: under TRITON_INTERPRET=1 the interpreter emulates the fp32->e4m3 cast itself and does not\n'
              '  round like the GPU (truncates subnormals, mishandles mantissa carry), so ~3% byte mismatches\n'
              '  and max rel err ~0.5 are expected there; on a GPU the cast is cvt.rn.satfinite.e4m3x2.')
    if args.check_only or device.type != 'cuda':
        return 0 if ok else 1

    B, L, H, D = args.batch, args.seqlen, args.heads, args.head_dim
    ntok = B * L
    elems = ntok * H * D  # per side
    tag = f'{B}x{L} d{D} h{H} page{args.page}'

    # FP8 e4m3 cache with per-tensor scales
    ks = torch.tensor(args.k_scale, dtype=torch.float32, device=device)
    vs = torch.tensor(args.v_scale, dtype=torch.float32, device=device)
    kc, vc = alloc_cache(inp, args, torch.float8_e4m3fn, device)
    k, v = inp['k'], inp['v']
    bytes_fp8 = 2 * elems * 2 + 2 * elems * 1
    report(f'lmdeploy fill_kv_cache {tag} bf16->e4m3', lambda: call(inp, k, v, kc, vc, ks, vs, QuantPolicy.FP8, args),
           bytes_fp8, args)
    del kc, vc

    if not args.skip_bf16:
        kc, vc = alloc_cache(inp, args, torch.bfloat16, device)
        bytes_bf16 = 2 * elems * 2 + 2 * elems * 2
        report(f'lmdeploy fill_kv_cache {tag} bf16->bf16 (quant_policy 0)',
               lambda: call(inp, k, v, kc, vc, None, None, QuantPolicy.NONE, args), bytes_bf16, args)
        del kc, vc

    if not args.skip_copy:
        src = torch.randn(2, ntok, H * D, device=device).to(torch.bfloat16)  # input size, both sides
        dst = torch.empty_like(src)
        report(f'torch copy_ bf16->bf16 {2 * elems} elems (input size)', lambda: dst.copy_(src),
               2 * elems * 2 * 2, args)
        dst8 = torch.empty(src.shape, dtype=torch.float8_e4m3fn, device=device)
        report(f'torch copy_ bf16->e4m3 {2 * elems} elems (same bytes as fp8 fill, unscaled)',
               lambda: dst8.copy_(src), bytes_fp8, args)
    print('note: GB/s = bytes / burst mean; fp8 bytes = 2 x ntok x H x D x 2 B read + 2 x ntok x H x D x 1 B written')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
