import torch, time, json
for n in (4096, 8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b; torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        t = time.perf_counter(); a @ b; torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); m = ts[len(ts)//2]
    bt = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize(); bt.append((time.perf_counter() - t) / 20)
    bt.sort(); mb = bt[len(bt)//2]
    print(json.dumps({"bench": f"torch_cublas_bf16_{n}", "ms": round(m*1e3, 4), "tflops": round(2*n**3/m/1e12, 1),
                      "back_to_back_ms": round(mb*1e3, 4), "back_to_back_tflops": round(2*n**3/mb/1e12, 1)}))
