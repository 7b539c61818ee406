//! Building a [`FusedDecode`]: the model's GPU weights and adapters, every buffer a step touches,
//! and the prompt's keys and values copied into the preallocated cache.

use super::*;

impl FusedDecode {
    pub(super) fn new(
        model: &Llama<Inner>,
        adapter: Option<&Adapter<Inner>>,
        cache: &KvCache<Inner>,
        cap: usize,
        sampling: Option<&SamplingParams>,
    ) -> Option<Self> {
        let cfg = &model.cfg;
        let rows = cache.key_valid.len();
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        if rows == 0
            || rows > DECODE_MAX_ROWS
            || cap > DECODE_MAX_KEYS
            || cache.len() >= cap
            || hd % 2 != 0
            || hd > DECODE_MAX_HEAD_DIM
            || nkv == 0
            || nh % nkv != 0
        {
            return None;
        }
        if adapter.is_some_and(|a| a.training && a.cfg.dropout > 0.0) {
            return None;
        }
        let device = model.device.clone();
        let client = CudaRuntime::client(&device);
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, block) in model.layers.iter().enumerate() {
            let mut lin = Vec::with_capacity(7);
            for name in MODULES {
                let base = block.linear(name)?;
                if base.bias.is_some() {
                    return None;
                }
                let gpu = base
                    .gpu
                    .get_or_init(|| crate::cuda::build(&base.weight, &device))
                    .clone()?;
                if !gpu.is_nf4() {
                    return None;
                }
                lin.push(gpu);
            }
            let mut lora = Vec::with_capacity(GROUPS.len());
            for members in GROUPS {
                // (output offset in the group, the module's A and B) of each adapted member.
                let mut out_off = 0;
                let mut pairs = Vec::new();
                for &m in members {
                    if let Some(p) = adapter.and_then(|a| a.layers.get(l)?.get(MODULES[m])) {
                        pairs.push((out_off, p));
                    }
                    out_off += lin[m].out_features();
                }
                if pairs.is_empty() {
                    lora.push(None);
                    continue;
                }
                let a = Tensor::cat(pairs.iter().map(|(_, p)| p.a.clone()).collect(), 0);
                let width = a.dims()[0];
                let mut b = Tensor::<Inner, 2>::zeros([out_off, width], &device);
                let mut col = 0;
                for (row, p) in &pairs {
                    let [out, rank] = p.b.dims();
                    b = b.slice_assign([*row..row + out, col..col + rank], p.b.clone());
                    col += rank;
                }
                lora.push(Some(GroupLora {
                    a: prim(a),
                    width,
                    outs: out_off,
                    bt: prim(b.transpose()),
                }));
            }
            layers.push(Layer {
                input_norm: prim(block.input_norm.clone()),
                post_norm: prim(block.post_norm.clone()),
                lin,
                lora,
            });
        }
        // The prefilled keys and values, copied once into caches of `cap` slots.
        let past = cache.len();
        let mut k_cache = Vec::with_capacity(layers.len());
        let mut v_cache = Vec::with_capacity(layers.len());
        for entry in &cache.layers {
            let (k, v) = entry.as_ref()?;
            let full = |x: &Tensor<Inner, 4>| {
                Tensor::<Inner, 4>::zeros([rows, nkv, cap, hd], &device)
                    .slice_assign([0..rows, 0..nkv, 0..past, 0..hd], x.clone())
            };
            k_cache.push(prim(full(k)));
            v_cache.push(prim(full(v)));
        }
        let valid: Vec<u32> = cache
            .key_valid
            .iter()
            .flat_map(|r| (0..cap).map(move |j| r.get(j).copied().unwrap_or(false) as u32))
            .collect();
        let valid = Tensor::<Inner, 1, burn::tensor::Int>::from_data(
            TensorData::new(
                valid.iter().map(|&v| v as i32).collect::<Vec<_>>(),
                [rows * cap],
            ),
            &device,
        );
        let valid = into_contiguous(valid.into_primitive());
        let f = |v: &[f32]| {
            prim(Tensor::<Inner, 1>::from_data(
                TensorData::new(v.to_vec(), [v.len()]),
                &device,
            ))
        };
        let head = match model.output_head() {
            OutputHead::Own(base) => {
                if base.bias.is_some() {
                    return None;
                }
                let gpu = base
                    .gpu
                    .get_or_init(|| crate::cuda::build(&base.weight, &device))
                    .clone()?;
                if gpu.is_nf4() {
                    if rows > GEMV_MAX_ROWS {
                        return None;
                    }
                    Head::Nf4(gpu)
                } else {
                    Head::Bf16(gpu)
                }
            }
            OutputHead::Tied(embed, _) => Head::Tied(Box::new(prim(embed))),
        };
        let vocab = cfg.vocab_size;
        let (h, q, kv, inter) = (cfg.hidden_size, nh * hd, nkv * hd, cfg.intermediate_size);
        let z_width = layers
            .iter()
            .flat_map(|l| l.lora.iter().flatten().map(|g| g.width))
            .max()
            .unwrap_or(1);
        let max_in = h.max(q).max(inter);
        // The largest group's weights, dequantized side by side.
        let max_group = layers
            .iter()
            .flat_map(|l| {
                GROUPS.iter().map(|members| {
                    let w = members.iter().map(|&m| &l.lin[m]);
                    w.map(|w| w.out_features() * w.in_features()).sum::<usize>()
                })
            })
            .max()
            .unwrap_or(1);
        let buf = |n: usize| {
            empty_device_contiguous_dtype(
                client.clone(),
                device.clone(),
                Shape::new([n]),
                DType::F32,
            )
        };
        let bufs = StepBufs {
            step: client.empty(step_words(rows) * 4),
            h: buf(rows * h),
            h2: buf(rows * h),
            x: buf(rows * h),
            qkv: buf(rows * (q + 2 * kv)),
            q: buf(rows * q),
            attn: buf(rows * q),
            gu: buf(rows * 2 * inter),
            act: buf(rows * inter),
            z: buf(rows * z_width),
            // Whole 16-row tiles for the MMA kernel's input (rows past `rows` stay zero).
            xb: prim(Tensor::<Inner, 1>::zeros(
                [rows.div_ceil(MMA_ROWS) * MMA_ROWS * max_in / 2 + 1],
                &device,
            )),
            ws: buf(max_group / 2 + 1),
            logits: buf(rows * vocab),
        };
        let mma = !crate::switches::switches().decode_dequant
            && layers.iter().all(|l| {
                GROUPS.iter().all(|members| {
                    let lins: Vec<&GpuLinear> = members.iter().map(|&m| &*l.lin[m]).collect();
                    nf4_mma::covers(&lins, rows)
                })
            });
        let vocab_filter = |p: &SamplingParams| p.top_k > 0 && p.top_k < vocab;
        let sampler = sampling
            .filter(|p| !vocab_filter(p) && (p.top_p >= 1.0 || p.temperature <= 0.0))
            .map(|p| {
                let mut banned = p.stop_ids.clone();
                let n_banned = banned.len();
                banned.push(0);
                Sampler {
                    banned: client.create_from_slice(u32::as_bytes(&banned)),
                    n_banned,
                    inv_temp: if p.temperature > 0.0 {
                        1.0 / p.temperature
                    } else {
                        1.0
                    },
                    greedy: p.temperature <= 0.0,
                    picks: client.empty(rows * 4),
                }
            });
        Some(Self {
            inv_freq: f(&model.inv_freq),
            embed: prim(model.embed.clone()),
            final_norm: prim(model.norm.clone()),
            head,
            vocab,
            bufs,
            sampler,
            host_step: Vec::new(),
            graph: None,
            skip: 0,
            plain_steps: 0,
            mma,
            scale: adapter.map(|a| a.scaling() as f32).unwrap_or(0.0),
            client,
            device,
            layers,
            k_cache,
            v_cache,
            valid,
            rows,
            cap,
            len: past,
            next_pos: cache.next_pos.clone(),
            hidden: cfg.hidden_size,
            nh,
            nkv,
            hd,
            inter: cfg.intermediate_size,
            eps: cfg.rms_norm_eps as f32,
            window: cfg.sliding_window.unwrap_or(0),
        })
    }
}
