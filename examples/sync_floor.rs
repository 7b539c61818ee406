//! The latency floor of a device-wide dependency on this GPU (GPU only): how long one step of a
//! chain "every cube finishes, then every cube may start" costs, measured two ways.
//!
//!     cargo build --release --features cuda --example sync_floor
//!     target/release/examples/sync_floor [CUBES] [HOPS]
//!
//! 1. `launches`: HOPS launches of a kernel that reads the previous launch's output, queued
//!    back to back on one stream (the dependency the decode's per-kernel chain has; inside a
//!    CUDA graph the host side is gone but the drain-and-refill of the GPU stays).
//! 2. `barrier`: one persistent launch of CUBES cubes that pass HOPS grid barriers (an atomic
//!    arrival counter in L2 and a spin on it; no memory fence, which a real barrier adds, so
//!    this is a lower bound).
//!
//! Why: a decode step of a 24-layer model has at least five device-wide dependencies per layer
//! (projections -> attention -> o -> gate/up -> down -> the next layer's projections); with a
//! few-row batch the step's bytes take ~60 us at 4.8 TB/s, so the hops' latency decides whether
//! any design can reach a given share of the bandwidth roofline. Prints one JSON line.

mod common;

use common::median;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::*;
use std::time::Instant;

/// Every cube adds one to `counter` and waits until all `CUBE_COUNT` cubes of this hop have,
/// `hops` times; cube 0 then writes what it saw last.
#[cube(launch_unchecked)]
fn barrier_chain(counter: &Array<Atomic<u32>>, out: &mut Array<u32>, hops: u32) {
    let cubes = CUBE_COUNT_X;
    let mut seen = 0u32;
    let mut i = 0u32;
    while i < hops {
        sync_cube();
        if UNIT_POS_X == 0 {
            counter[0].fetch_add(1u32);
            let target = (i + 1) * cubes;
            seen = counter[0].load();
            while seen < target {
                seen = counter[0].load();
            }
        }
        sync_cube();
        i += 1;
    }
    if UNIT_POS_X == 0 && CUBE_POS_X == 0 {
        out[0] = seen;
    }
}

/// One hop of the launch chain: every cube reads the previous launch's value and writes it + 1
/// (cube 0 only writes, so the next launch depends on this one's data).
#[cube(launch_unchecked)]
fn launch_hop(input: &Array<u32>, out: &mut Array<u32>) {
    let v = input[0];
    if UNIT_POS_X == 0 && CUBE_POS_X == 0 {
        out[0] = v + 1;
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cubes: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(132);
    let hops: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let client = CudaRuntime::client(&CudaDevice::new(0));
    let zeros = |n: usize| client.create_from_slice(u32::as_bytes(&vec![0u32; n]));
    let read = |h: &cubecl::server::Handle| -> u32 {
        let bytes = client.read_one(h.clone()).expect("read back");
        u32::from_bytes(&bytes)[0]
    };

    // Launch chain: ping-pong between two one-word buffers.
    let (a, b) = (zeros(1), zeros(1));
    let mut launch_times = Vec::new();
    for _ in 0..5 {
        read(&a);
        let t0 = Instant::now();
        for i in 0..hops {
            let (src, dst) = if i.is_multiple_of(2) {
                (&a, &b)
            } else {
                (&b, &a)
            };
            // SAFETY: both buffers hold one u32.
            unsafe {
                launch_hop::launch_unchecked::<CudaRuntime>(
                    &client,
                    CubeCount::Static(cubes, 1, 1),
                    CubeDim::new_1d(32),
                    ArrayArg::from_raw_parts(src.clone(), 1),
                    ArrayArg::from_raw_parts(dst.clone(), 1),
                )
            };
        }
        read(if hops.is_multiple_of(2) { &a } else { &b });
        launch_times.push(t0.elapsed().as_secs_f64() / hops as f64);
    }

    // Grid barrier chain: one launch, `hops` barriers.
    let mut barrier_times = Vec::new();
    let mut last = 0;
    for _ in 0..5 {
        let (counter, out) = (zeros(1), zeros(1));
        read(&out);
        let t0 = Instant::now();
        // SAFETY: counter and out hold one u32; every cube must be resident at once (cubes <=
        // SMs with 32 units each), or the spin never ends.
        unsafe {
            barrier_chain::launch_unchecked::<CudaRuntime>(
                &client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(32),
                ArrayArg::from_raw_parts(counter.clone(), 1),
                ArrayArg::from_raw_parts(out.clone(), 1),
                hops,
            )
        };
        last = read(&out);
        barrier_times.push(t0.elapsed().as_secs_f64() / hops as f64);
    }
    anyhow::ensure!(
        last == hops * cubes,
        "barrier chain ended at {last}, expected {}",
        hops * cubes
    );
    println!(
        "{{\"check\":\"sync_floor\",\"cubes\":{cubes},\"hops\":{hops},\"us_per_launch_hop\":{:.3},\"us_per_grid_barrier\":{:.3}}}",
        median(launch_times) * 1e6,
        median(barrier_times) * 1e6
    );
    Ok(())
}
