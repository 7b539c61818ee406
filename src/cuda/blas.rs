//! bf16 GEMMs through cuBLASLt on raw device pointers.
//!
//! cubecl allocates from the CUDA primary context, so the pointers it hands out (`get_resource`)
//! are valid here once that context is current on the calling thread. The GEMM is enqueued on the
//! stream cubecl orders those buffers on (our patched cubecl-cuda hands it out with the resource,
//! see patches/cubecl-cuda/RLHF_PATCH.md): cubecl's kernels before it have produced the inputs,
//! its kernels after it see the output, and nobody waits on the host.

use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::result as drv;
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// cuBLASLt's recommended workspace on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// The inputs' element type; the output and accumulation are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmIn {
    /// bf16 inputs on the tensor cores (the frozen base's GEMMs).
    Bf16,
    /// f32 inputs computed in TF32 (attention, LoRA factors), as burn-cuda's own matmul does.
    F32Tf32,
}

/// A GEMM shape in cuBLAS' column-major terms: `D[m, n] = op(A)[m, k] · op(B)[k, n]`, repeated
/// over `batch` matrices `stride_*` elements apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldd: i64,
    pub input: GemmIn,
    pub batch: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_d: i64,
}

impl GemmShape {
    /// One (unbatched) GEMM with bf16 inputs.
    #[allow(clippy::too_many_arguments)]
    pub fn bf16(
        trans_a: bool,
        trans_b: bool,
        m: u64,
        n: u64,
        k: u64,
        lda: i64,
        ldb: i64,
        ldd: i64,
    ) -> Self {
        Self {
            trans_a,
            trans_b,
            m,
            n,
            k,
            lda,
            ldb,
            ldd,
            input: GemmIn::Bf16,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_d: 0,
        }
    }

    /// Row-major `C[rows, cols] = op(X)[rows, inner] · op(Y)[inner, cols]` for contiguous
    /// matrices, `batch` of each packed back to back: `X` is stored `[rows, inner]` (or
    /// `[inner, rows]` when `trans_x`), `Y` `[inner, cols]` (or `[cols, inner]`). cuBLAS sees the
    /// transposed problem `C^T = op(Y)^T · op(X)^T`, so its `A` is `Y` and its `B` is `X`.
    pub fn row_major(
        input: GemmIn,
        batch: usize,
        (rows, inner, cols): (usize, usize, usize),
        trans_x: bool,
        trans_y: bool,
    ) -> Self {
        let (r, i, c) = (rows as u64, inner as u64, cols as u64);
        Self {
            trans_a: trans_y,
            trans_b: trans_x,
            m: c,
            n: r,
            k: i,
            lda: if trans_y { i } else { c } as i64,
            ldb: if trans_x { r } else { i } as i64,
            ldd: c as i64,
            input,
            batch: batch as i32,
            stride_a: (i * c) as i64,
            stride_b: (r * i) as i64,
            stride_d: (r * c) as i64,
        }
    }

    /// Elements each operand spans (for bounds checks by the caller): `(a, b, d)`.
    pub fn spans(&self) -> (u64, u64, u64) {
        let cols = |trans: bool, rows_op: u64, cols_op: u64| if trans { rows_op } else { cols_op };
        let span = |ld: i64, ncols: u64, stride: i64| {
            (self.batch as u64 - 1) * stride as u64 + ld as u64 * ncols
        };
        (
            span(self.lda, cols(self.trans_a, self.m, self.k), self.stride_a),
            span(self.ldb, cols(self.trans_b, self.k, self.n), self.stride_b),
            span(self.ldd, self.n, self.stride_d),
        )
    }
}

/// The descriptors and the heuristic's algorithm for one shape, made once.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    plans: HashMap<GemmShape, Plan>,
}

// SAFETY: the handle, descriptors and workspace are only used under the `BLAS` mutex.
unsafe impl Send for Blas {}

static BLAS: Mutex<Option<Blas>> = Mutex::new(None);

thread_local! {
    /// Whether this thread has made the primary context of the device current.
    static CONTEXT_SET: Cell<bool> = const { Cell::new(false) };
}

/// Makes device `ordinal`'s primary context (the one cubecl uses) current on this thread.
pub fn ensure_context(ordinal: usize) -> Result<()> {
    if CONTEXT_SET.with(|c| c.get()) {
        return Ok(());
    }
    drv::init().map_err(|e| anyhow!("CUDA init: {e:?}"))?;
    let dev = drv::device::get(ordinal as i32).map_err(|e| anyhow!("CUDA device: {e:?}"))?;
    // SAFETY: retaining the primary context of a valid device; cubecl retains it too.
    unsafe {
        let ctx = drv::primary_ctx::retain(dev).map_err(|e| anyhow!("CUDA context: {e:?}"))?;
        drv::ctx::set_current(ctx).map_err(|e| anyhow!("CUDA context: {e:?}"))?;
    }
    CONTEXT_SET.with(|c| c.set(true));
    Ok(())
}

fn layout(
    rows: u64,
    cols: u64,
    ld: i64,
    ty: sys::cudaDataType,
    batch: i32,
    stride: i64,
) -> Result<sys::cublasLtMatrixLayout_t> {
    let l = lt::create_matrix_layout(ty, rows, cols, ld)
        .map_err(|e| anyhow!("cuBLASLt layout: {e:?}"))?;
    if batch > 1 {
        // SAFETY: the attributes are an i32 and an i64, the sizes cuBLASLt documents for them.
        unsafe {
            lt::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &batch as *const i32 as *const c_void,
                4,
            )
            .map_err(|e| anyhow!("cuBLASLt batch count: {e:?}"))?;
            lt::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride as *const i64 as *const c_void,
                8,
            )
            .map_err(|e| anyhow!("cuBLASLt batch stride: {e:?}"))?;
        }
    }
    Ok(l)
}

impl Blas {
    fn new() -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| anyhow!("cuBLASLt handle: {e:?}"))?;
        // SAFETY: plain device allocation in the current (primary) context.
        let workspace = unsafe { drv::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| anyhow!("cuBLASLt workspace: {e:?}"))?;
        Ok(Self {
            handle,
            workspace,
            plans: HashMap::new(),
        })
    }

    fn plan(&mut self, s: GemmShape) -> Result<&Plan> {
        if !self.plans.contains_key(&s) {
            let f32t = sys::cudaDataType::CUDA_R_32F;
            let (in_t, compute) = match s.input {
                GemmIn::Bf16 => (
                    sys::cudaDataType::CUDA_R_16BF,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                ),
                GemmIn::F32Tf32 => (f32t, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32),
            };
            let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
            let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
            let a = layout(ar, ac, s.lda, in_t, s.batch, s.stride_a)?;
            let b = layout(br, bc, s.ldb, in_t, s.batch, s.stride_b)?;
            let d = layout(s.m, s.n, s.ldd, f32t, s.batch, s.stride_d)?;
            let desc = lt::create_matmul_desc(compute, f32t)
                .map_err(|e| anyhow!("cuBLASLt desc: {e:?}"))?;
            let pref = lt::create_matmul_pref().map_err(|e| anyhow!("cuBLASLt pref: {e:?}"))?;
            // SAFETY: attribute buffers are plain values of the sizes cuBLASLt expects.
            let algo = unsafe {
                for (attr, t) in [
                    (
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                        s.trans_a,
                    ),
                    (
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                        s.trans_b,
                    ),
                ] {
                    let op = t as i32;
                    lt::set_matmul_desc_attribute(
                        desc,
                        attr,
                        &op as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(|e| anyhow!("cuBLASLt transpose: {e:?}"))?;
                }
                let ws = WORKSPACE_BYTES as u64;
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )
                .map_err(|e| anyhow!("cuBLASLt workspace pref: {e:?}"))?;
                let h = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref)
                    .map_err(|e| anyhow!("cuBLASLt has no algorithm for {s:?}: {e:?}"))?;
                let _ = lt::destroy_matmul_pref(pref);
                h.algo
            };
            self.plans.insert(
                s,
                Plan {
                    desc,
                    a,
                    b,
                    d,
                    algo,
                },
            );
        }
        Ok(&self.plans[&s])
    }
}

/// `D (f32) = alpha op(A) · op(B) + beta C` (column-major, as cuBLAS sees them; `C` has `D`'s
/// layout and may be `D` itself), enqueued on
/// `stream` (cubecl's, which orders the buffers) without waiting. The caller holds the buffers
/// alive until the call returns (later reuse of their memory is ordered by the stream);
/// `ordinal` is the device whose primary context owns them.
///
/// # Safety
/// `stream` is a live stream of that context, and `a`, `b`, `c`, `d` are device addresses of
/// buffers holding what `s` reads and writes (`gemm::gemm_at` checks the sizes).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    ordinal: usize,
    stream: sys::cudaStream_t,
    s: GemmShape,
    alpha: f32,
    beta: f32,
    a: u64,
    b: u64,
    c: u64,
    d: u64,
) -> Result<()> {
    ensure_context(ordinal)?;
    let mut guard = BLAS
        .lock()
        .map_err(|_| anyhow!("cuBLASLt state poisoned"))?;
    if guard.is_none() {
        *guard = Some(Blas::new()?);
    }
    let blas = guard.as_mut().expect("initialised above");
    let handle = blas.handle;
    let workspace = blas.workspace;
    let plan = blas.plan(s)?;
    // SAFETY: pointers are live device buffers of the sizes the layouts describe (checked by the
    // caller); C is read only when beta != 0.
    unsafe {
        lt::matmul(
            handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a as *const c_void,
            plan.a,
            b as *const c_void,
            plan.b,
            c as *const c_void,
            plan.d,
            d as *mut c_void,
            plan.d,
            &plan.algo,
            workspace as *mut c_void,
            WORKSPACE_BYTES,
            stream,
        )
        .map_err(|e| anyhow!("cuBLASLt matmul {s:?}: {e:?}"))?;
    }
    Ok(())
}
