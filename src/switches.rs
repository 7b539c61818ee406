//! The runtime switches: `RLHF_*` environment variables for A/B measurements and tracing, read
//! once per process (README, "Runtime switches"). A switch is on when its variable is set, to any
//! value. They change how a result is computed or what is printed, never what is computed.

use std::sync::OnceLock;

/// Every switch, read from the environment at first use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    /// `RLHF_NO_FUSED_TRAIN`: the decoder block's many-row ops (training, prefill) take burn's
    /// ops instead of the fused CUDA kernels.
    pub no_fused_train: bool,
    /// `RLHF_NO_FUSED_DECODE`: sampling takes the ordinary forward instead of the fused CUDA
    /// decode.
    pub no_fused_decode: bool,
    /// `RLHF_NO_DECODE_GRAPH`: the fused decode launches its kernels one by one instead of
    /// replaying a captured CUDA graph.
    pub no_decode_graph: bool,
    /// `RLHF_DECODE_DEQUANT`: the fused decode's projections dequantize to bf16 and run a
    /// cuBLASLt GEMM instead of reading NF4 with tensor cores.
    pub decode_dequant: bool,
    /// `RLHF_F32_CHECKPOINTS`: checkpointed block inputs stay f32 on CUDA instead of bf16.
    pub f32_checkpoints: bool,
    /// `RLHF_TRACE`: sampling prints where its time goes.
    pub trace: bool,
    /// `RLHF_TRACE_MEM`: each labelled memory high point prints the allocator's numbers.
    pub trace_mem: bool,
    /// `RLHF_NO_ALLOC_LIMIT`: the CUDA allocator's cache is not bounded (`plan.cache`).
    pub no_alloc_limit: bool,
    /// `RLHF_NO_CPU_WEIGHT_CACHE`: off CUDA, NF4 weights are dequantized on every forward
    /// instead of once (`model::linear`).
    pub no_cpu_weight_cache: bool,
}

impl Switches {
    /// The variables, in the order of the fields.
    pub const NAMES: [&'static str; 9] = [
        "RLHF_NO_FUSED_TRAIN",
        "RLHF_NO_FUSED_DECODE",
        "RLHF_NO_DECODE_GRAPH",
        "RLHF_DECODE_DEQUANT",
        "RLHF_F32_CHECKPOINTS",
        "RLHF_TRACE",
        "RLHF_TRACE_MEM",
        "RLHF_NO_ALLOC_LIMIT",
        "RLHF_NO_CPU_WEIGHT_CACHE",
    ];

    /// The switches as `is_set` answers for each variable name.
    pub fn from_lookup(is_set: impl Fn(&str) -> bool) -> Self {
        let [no_fused_train, no_fused_decode, no_decode_graph, decode_dequant, f32_checkpoints, trace, trace_mem, no_alloc_limit, no_cpu_weight_cache] =
            Self::NAMES.map(is_set);
        Self {
            no_fused_train,
            no_fused_decode,
            no_decode_graph,
            decode_dequant,
            f32_checkpoints,
            trace,
            trace_mem,
            no_alloc_limit,
            no_cpu_weight_cache,
        }
    }

    /// The switches of this process's environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name).is_some())
    }
}

/// This process's switches, read from the environment once.
pub fn switches() -> &'static Switches {
    static SWITCHES: OnceLock<Switches> = OnceLock::new();
    SWITCHES.get_or_init(Switches::from_env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variable_sets_its_own_field() {
        let off = Switches::from_lookup(|_| false);
        assert_eq!(off, Switches::default());
        let fields = |s: Switches| {
            [
                s.no_fused_train,
                s.no_fused_decode,
                s.no_decode_graph,
                s.decode_dequant,
                s.f32_checkpoints,
                s.trace,
                s.trace_mem,
                s.no_alloc_limit,
                s.no_cpu_weight_cache,
            ]
        };
        for (i, name) in Switches::NAMES.iter().enumerate() {
            let on = fields(Switches::from_lookup(|n| n == *name));
            let expected: Vec<bool> = (0..on.len()).map(|j| j == i).collect();
            assert_eq!(on.to_vec(), expected, "{name}");
        }
    }

    #[test]
    fn the_readme_documents_every_switch_in_one_table() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## Runtime switches")
            .expect("README has a `## Runtime switches` section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        for name in Switches::NAMES {
            assert!(
                section.contains(&format!("| `{name}` |")),
                "README's switch table has no row for {name}"
            );
        }
    }
}
