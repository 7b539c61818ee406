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

/// A GEMM shape in cuBLAS' column-major terms: `D[m, n] = op(A)[m, k] · op(B)[k, n]`.
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
) -> Result<sys::cublasLtMatrixLayout_t> {
    lt::create_matrix_layout(ty, rows, cols, ld).map_err(|e| anyhow!("cuBLASLt layout: {e:?}"))
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
            let bf16 = sys::cudaDataType::CUDA_R_16BF;
            let f32t = sys::cudaDataType::CUDA_R_32F;
            let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
            let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
            let a = layout(ar, ac, s.lda, bf16)?;
            let b = layout(br, bc, s.ldb, bf16)?;
            let d = layout(s.m, s.n, s.ldd, f32t)?;
            let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)
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

/// `D (f32) = op(A) · op(B)` with bf16 `A`, `B` (column-major, as cuBLAS sees them), enqueued on
/// `stream` (cubecl's, which orders the buffers) without waiting. The caller holds the buffers
/// alive until the call returns (later reuse of their memory is ordered by the stream);
/// `ordinal` is the device whose primary context owns them.
pub fn gemm_bf16(
    ordinal: usize,
    stream: sys::cudaStream_t,
    s: GemmShape,
    a: u64,
    b: u64,
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
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: pointers are live device buffers of the sizes the layouts describe (checked by the
    // caller); `d` is both C (unused, beta = 0) and D.
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
            d as *const c_void,
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
