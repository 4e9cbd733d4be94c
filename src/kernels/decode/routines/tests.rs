//! The plan of one launch and the Auto table, on CPU (hand-written expectations).

use super::*;
use crate::kernels::decode::definition::DecodeShape;

#[test]
fn huge_windows_clamp_below_the_u32_wrap() {
    // Every position is at most i32::MAX - 1, so t + window must not wrap for t < 2^31.
    let max = i32::MAX as u32;
    for (window, want) in [
        (Some(1), 1),
        (Some(4096), 4096),
        (Some(i32::MAX as usize), max),
        (Some(i32::MAX as usize + 1), max),
        (Some(u32::MAX as usize), max),
        (Some(1usize << 32), max),
        (Some(usize::MAX), max),
    ] {
        let got = kernel_window(window);
        assert_eq!(got, want, "{window:?}");
        if got == max {
            // From the last possible position, key 0 is visible and t + window never wraps.
            let last = i32::MAX as u32 - 1;
            assert!(got > last, "{window:?}");
            assert!(last.checked_add(got).is_some(), "{window:?}");
        }
    }
}

/// Shapes → plans: the kernel, its rows per cube and the split plan, decided in one place
/// (hand-derived expectations: the measured winner per class, `SplitPlan`'s one-wave
/// choices worked out in `key_major_counts_the_cubes_its_registers_allow`).
#[test]
fn plans_for_a_table_of_shapes() {
    let opts = DecodeOptions::default();
    let auto = |s: &DecodeProblem| plan_decode(s, &opts);
    let forced = |s: &DecodeProblem, st: DecodeStrategy| {
        plan_decode(s, &DecodeOptions::default().with_strategy(st))
    };
    let llama = problem(Dtype::E4m3, Dtype::Bf16, 32, 8, (128, 128), 1, 1, 32768);

    // Llama-3-8B, batch 1 × 32k, e4m3: key-major, one 8-row tile, 4 resident cubes, so
    // 64 splits of 512 tokens in one wave; the workspace holds every split.
    let p = auto(&llama).unwrap();
    let RoutineConfig::KeyMajor(c) = p.routine else {
        panic!("{:?}", p.routine)
    };
    assert!(c.key_major);
    assert_eq!((p.rows, p.row_blocks), (8, 1));
    assert_eq!((p.split.num_splits, p.split.split_tokens), (64, 512));
    assert_eq!(p.workspace.num_splits, 64);
    assert_eq!((p.workspace.num_tokens, p.workspace.num_heads), (1, 32));
    assert_eq!(p.workspace.head_dim_v, 128);

    // Forcing the default layout: 3 resident cubes, 704-token splits.
    let p = forced(&llama, DecodeStrategy::TensorCores).unwrap();
    assert!(matches!(p.routine, RoutineConfig::TensorCores(c) if !c.key_major));
    assert_eq!(p.split.split_tokens, 704);

    // The bf16 cache keeps the default tensor-core kernel.
    let bf16 = DecodeProblem {
        cache: Dtype::Bf16,
        ..llama
    };
    assert!(matches!(auto(&bf16).unwrap().routine, RoutineConfig::TensorCores(c) if !c.key_major));

    // A 4-token speculative step: 16 rows per KV head, two row tiles, default layout.
    let spec = problem(Dtype::E4m3, Dtype::Bf16, 32, 8, (128, 128), 32, 4, 4096);
    let p = auto(&spec).unwrap();
    assert!(matches!(p.routine, RoutineConfig::TensorCores(c) if !c.key_major && c.row_tiles == 2));
    assert_eq!((p.rows, p.row_blocks), (16, 1));
    assert_eq!(p.workspace.num_tokens, 128);

    // SmolLM2 (9/3, d64): key-major; Llama-3.2-1B (32/8, d64): default.
    let smol = problem(Dtype::E4m3, Dtype::Bf16, 9, 3, (64, 64), 32, 1, 8192);
    assert!(matches!(auto(&smol).unwrap().routine, RoutineConfig::KeyMajor(c) if c.key_major));
    let l1b = problem(Dtype::E4m3, Dtype::Bf16, 32, 8, (64, 64), 32, 1, 8192);
    assert!(matches!(auto(&l1b).unwrap().routine, RoutineConfig::TensorCores(c) if !c.key_major));
    let smol_bf16 = DecodeProblem {
        cache: Dtype::Bf16,
        ..smol
    };
    assert!(matches!(auto(&smol_bf16).unwrap().routine, RoutineConfig::KeyMajor(c) if c.key_major));

    // MLA: the wide kernel (16 rows, two row tiles); with f32 queries, CUDA cores.
    let mla = problem(Dtype::E4m3, Dtype::Bf16, 16, 1, (576, 512), 4, 1, 2000);
    let p = auto(&mla).unwrap();
    assert!(matches!(p.routine, RoutineConfig::Wide(c) if c.key_major));
    assert_eq!((p.rows, p.row_blocks), (16, 1));
    assert_eq!(p.workspace.head_dim_v, 512);
    let mla_f32 = DecodeProblem {
        act: Dtype::F32,
        ..mla
    };
    let p = auto(&mla_f32).unwrap();
    let RoutineConfig::CudaCores(cfg) = p.routine else {
        panic!("{:?}", p.routine)
    };
    assert_eq!(cfg.rows as usize, p.rows);
    assert!(p.rows * p.row_blocks >= 16);

    // No MMA on the device: CUDA cores; a forced tensor-core path on a head dim it does not
    // take: an error, not a fallback.
    let no_mma = DecodeProblem {
        mma: false,
        ..llama
    };
    assert!(matches!(
        auto(&no_mma).unwrap().routine,
        RoutineConfig::CudaCores(_)
    ));
    let d80 = problem(Dtype::E4m3, Dtype::Bf16, 28, 4, (80, 80), 2, 1, 100);
    let e = forced(&d80, DecodeStrategy::TensorCores).unwrap_err();
    assert!(matches!(e, Fp8KvError::InvalidOption(_)), "{e}");

    // A forced split length: ceil(1000 / 64) = 16 splits of 64 tokens.
    let short = problem(Dtype::E4m3, Dtype::Bf16, 32, 8, (128, 128), 3, 1, 1000);
    let p = plan_decode(
        &short,
        &DecodeOptions::default().with_split(SplitChoice::Tokens(64)),
    )
    .unwrap();
    assert_eq!((p.split.num_splits, p.split.split_tokens), (16, 64));
    assert_eq!(p.workspace.num_splits, 16);
}

/// The shape-class table of `auto_strategy_for`, one row per class (hand-written
/// expectations: the measured winner of each class).
#[test]
fn auto_picks_the_measured_winner_per_shape_class() {
    use DecodeStrategy::{CudaCores, KeyMajor, TensorCores, Wide};
    use Dtype::{Bf16, E4m3, E5m2, F16, F32};
    // (cache, query, dk, dv, group, new tokens, MMA on the device, expected)
    let table = [
        (E4m3, Bf16, 128, 128, 4, 1, true, KeyMajor), // Llama-3-8B
        (E5m2, F16, 128, 128, 4, 1, true, KeyMajor),
        (E4m3, Bf16, 128, 128, 4, 2, true, KeyMajor), // 8 rows: one tile
        (E4m3, Bf16, 128, 128, 4, 4, true, TensorCores), // 16 rows: two tiles
        (E4m3, Bf16, 256, 256, 2, 1, true, KeyMajor), // Gemma-2
        (E4m3, Bf16, 64, 64, 3, 1, true, KeyMajor),   // SmolLM2
        (E4m3, Bf16, 64, 64, 4, 1, true, TensorCores), // Llama-3.2-1B
        (Bf16, Bf16, 128, 128, 4, 1, true, TensorCores),
        (F16, F16, 64, 64, 3, 1, true, KeyMajor), // SmolLM2, unquantized
        (Bf16, Bf16, 64, 64, 4, 1, true, TensorCores),
        (Bf16, Bf16, 64, 64, 3, 3, true, TensorCores), // 9 rows: two tiles
        (E4m3, Bf16, 576, 512, 16, 1, true, Wide),     // MLA
        (Bf16, Bf16, 576, 512, 16, 1, true, Wide),
        (E4m3, F32, 576, 512, 16, 1, true, CudaCores),
        (E4m3, F32, 128, 128, 4, 1, true, KeyMajor), // f32 queries in parts
        (E4m3, Bf16, 96, 96, 4, 1, true, CudaCores),
        (E4m3, Bf16, 128, 128, 4, 1, false, CudaCores), // no MMA on the device
        (E4m3, Bf16, 128, 128, 0, 1, true, CudaCores),
    ];
    for (cache, query, dk, dv, group, q_len, mma, expected) in table {
        let shape = DecodeShape {
            cache,
            query,
            head_dim_k: dk,
            head_dim_v: dv,
            group,
            max_q_len: q_len,
        };
        assert_eq!(
            auto_strategy_for(&shape.probe(mma)),
            expected,
            "{cache} cache, {query} queries, {dk}/{dv}, group {group}, {q_len} new tokens"
        );
    }
}

/// Where the splits merge: Auto in the tensor-core split kernels up to 16 splits (measured
/// faster), the combine kernel beyond (measured faster at 1 × 32k's 64 splits) and for the
/// wide and CUDA-core kernels; InKernel up to 64, an error beyond; Separate never in the
/// kernel.
#[test]
fn auto_merges_in_the_split_kernel_up_to_16_splits() {
    let with = |c: CombineChoice| DecodeOptions::default().with_combine(c);
    let plan = |batch: usize, kv: usize, opts: &DecodeOptions| {
        let p = problem(Dtype::E4m3, Dtype::Bf16, 32, 8, (128, 128), batch, 1, kv);
        plan_decode(&p, opts)
    };
    let auto = with(CombineChoice::Auto);
    // 1 × 32k: 64 splits (`plans_for_a_table_of_shapes`).
    let p = plan(1, 32768, &auto).unwrap();
    assert_eq!(p.split.num_splits, 64);
    assert!(!p.merge.on);
    assert!(
        plan(1, 32768, &with(CombineChoice::InKernel))
            .unwrap()
            .merge
            .on
    );
    // 1 × 4096: 16 splits; 32 × 4096: 2.
    let p = plan(1, 4096, &auto).unwrap();
    assert_eq!(p.split.num_splits, 16);
    assert!(p.merge.on);
    let p = plan(32, 4096, &auto).unwrap();
    assert_eq!(p.split.num_splits, 2);
    assert!(p.merge.on);
    assert!(
        !plan(32, 4096, &with(CombineChoice::Separate))
            .unwrap()
            .merge
            .on
    );
    // 128 splits of 256 tokens: too many for the in-kernel merge.
    let many = with(CombineChoice::InKernel).with_split(SplitChoice::Tokens(256));
    assert!(matches!(
        plan(1, 32768, &many),
        Err(Fp8KvError::InvalidOption(_))
    ));
    let p = plan(1, 32768, &auto.clone().with_split(SplitChoice::Tokens(256))).unwrap();
    assert_eq!(p.split.num_splits, 128);
    assert!(!p.merge.on);
    // MLA 576/512 (the wide kernel, 8 splits at 32 × 8192: its merge measured 1.5× slower)
    // and head dim 96 (CUDA cores: not measured) keep the combine kernel under Auto, not
    // under InKernel.
    for (heads, kv_heads, dims, kv_len, strategy) in [
        (16, 1, (576, 512), 8192, DecodeStrategy::Wide),
        (32, 8, (96, 96), 4096, DecodeStrategy::CudaCores),
    ] {
        let p = problem(
            Dtype::E4m3,
            Dtype::Bf16,
            heads,
            kv_heads,
            dims,
            32,
            1,
            kv_len,
        );
        let auto_plan = plan_decode(&p, &auto).unwrap();
        assert_eq!(auto_plan.routine.strategy(), strategy);
        assert!(auto_plan.split.num_splits <= 16);
        assert!(!auto_plan.merge.on, "{strategy}");
        assert!(
            plan_decode(&p, &with(CombineChoice::InKernel))
                .unwrap()
                .merge
                .on
        );
    }
    // Sinks join the merge only where it is on.
    let mut sinks = with(CombineChoice::Auto);
    sinks.attention.sinks = Some(vec![0.5; 32]);
    assert!(plan(32, 4096, &sinks).unwrap().merge.sinks);
    assert!(!plan(1, 32768, &sinks).unwrap().merge.sinks);
}
