//! `codegen --ptx --against DIR`: the same kernels as an earlier run's output folder? A
//! refactor that moves `#[cube]` code around must not change what the GPU runs. For each
//! kernel (by its report name) it compares
//! - the generated CUDA C++ as a multiset of lines, with the shared-memory offsets blanked:
//!   CubeCL 0.10 emits the struct definitions and places the shared arrays in an order that
//!   changes from run to run of the same binary (two runs of one build differ in 3 of 140
//!   kernels), which also moves PTX around (an `add` for a nonzero offset, a narrower shared
//!   vector access where an offset is less aligned);
//! - the registers (NVRTC's report);
//! - the multiset of PTX instructions (opcode with its type and state suffixes, predicates
//!   stripped), printed where it differs, which the shared-memory placement alone can explain
//!   only when the source comparison passes.
//!
//! It fails when a source or a register count differs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The report's registers column as written to `registers.tsv`: `stem \t regs`.
pub const REGISTERS_FILE: &str = "registers.tsv";

/// The CUDA source's lines with shared-memory offsets blanked, counted.
fn source_lines(cu: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in cu.lines() {
        let mut norm = String::with_capacity(line.len());
        let mut rest = line;
        while let Some(at) = rest.find("dynamic_shared_mem[") {
            let (head, tail) = rest.split_at(at + "dynamic_shared_mem[".len());
            norm.push_str(head);
            norm.push('_');
            rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        norm.push_str(rest);
        *counts.entry(norm).or_insert(0) += 1;
    }
    counts
}

/// Opcode counts of one PTX file's instructions.
fn opcodes(ptx: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in ptx.lines() {
        let line = line.trim();
        if line.is_empty()
            || line.starts_with("//")
            || line.starts_with('.')
            || line.starts_with('{')
            || line.starts_with('}')
            || line.starts_with(')')
            || line.ends_with(':')
        {
            continue;
        }
        let mut tokens = line.split_whitespace();
        let Some(mut op) = tokens.next() else {
            continue;
        };
        if op.starts_with('@') {
            let Some(next) = tokens.next() else {
                continue;
            };
            op = next;
        }
        let op = op.trim_end_matches(';');
        *counts.entry(op.to_string()).or_insert(0) += 1;
    }
    counts
}

fn registers(dir: &Path) -> Result<BTreeMap<String, String>, String> {
    let path = dir.join(REGISTERS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect())
}

fn ptx_stems(dir: &Path) -> Result<BTreeSet<String>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_suffix(".ptx").map(str::to_string)
        })
        .collect())
}

/// Compares this run's folder `new` with `old`; prints one line per difference and a summary,
/// and fails when anything differs.
pub fn compare(old: &Path, new: &Path) -> Result<(), String> {
    let (a, b) = (ptx_stems(old)?, ptx_stems(new)?);
    let (ra, rb) = (registers(old)?, registers(new)?);
    let mut differ = 0;
    for stem in a.symmetric_difference(&b) {
        let side = if a.contains(stem) {
            "only before"
        } else {
            "only now"
        };
        println!("  {stem}: {side}");
        differ += 1;
    }
    let (mut same, mut layout_only) = (0, 0);
    for stem in a.intersection(&b) {
        let read = |d: &Path, ext: &str| {
            let path = d.join(format!("{stem}.{ext}"));
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let (pa, pb) = (read(old, "ptx")?, read(new, "ptx")?);
        let (oa, ob) = (opcodes(&pa), opcodes(&pb));
        let (ga, gb) = (ra.get(stem), rb.get(stem));
        let source_same = source_lines(&read(old, "cu")?) == source_lines(&read(new, "cu")?);
        if oa == ob && ga == gb && source_same {
            same += 1;
            continue;
        }
        let (na, nb): (usize, usize) = (oa.values().sum(), ob.values().sum());
        let verdict = if source_same && ga == gb {
            layout_only += 1;
            "same source and registers; PTX moved by the shared-memory placement"
        } else {
            differ += 1;
            if source_same {
                "REGISTERS DIFFER"
            } else {
                "SOURCE DIFFERS"
            }
        };
        println!(
            "  {stem}: {verdict}: {na} -> {nb} instructions, registers {} -> {}",
            ga.map_or("-", String::as_str),
            gb.map_or("-", String::as_str)
        );
        for op in oa.keys().chain(ob.keys()).collect::<BTreeSet<_>>() {
            let (x, y) = (
                oa.get(op).copied().unwrap_or(0),
                ob.get(op).copied().unwrap_or(0),
            );
            if x != y {
                println!("      {op}: {x} -> {y}");
            }
        }
    }
    println!(
        "codegen --against {}: {} kernels; {same} with the same source, registers and PTX instruction multiset; {layout_only} with the same source and registers whose PTX differs only by CubeCL's shared-memory placement; {differ} different",
        old.display(),
        a.union(&b).count()
    );
    if differ == 0 {
        Ok(())
    } else {
        Err(format!("{differ} kernel(s) differ from {}", old.display()))
    }
}
