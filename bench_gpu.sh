#!/usr/bin/env bash
# The GPU path, measured in one go (issue 17). On one GPU, in about 8 minutes:
#   1. every script's --smoke in bf16 on CUDA;
#   2. every script's --bench at the paper's size in bf16 (its last line, `bench: ...`);
#   3. MAE ViT-B (and ViT-L) training throughput at batch 128, bf16, with and without --compile;
#   4. peak memory of a training step: Rev-ViT vs vanilla at depth 24, ViTDet-B at 1024 global vs windowed.
# Everything goes to $OUT/bench_gpu.log (or ./bench_gpu.log), so it survives a failing step.
#
#   bash bench_gpu.sh              # on a GPU machine
#   bash bench_gpu.sh --rehearse   # on a CPU: the same steps with tiny models and fp32/bf16 on CPU
set -u
cd "$(dirname "$0")"
LOG="${OUT:-.}/bench_gpu.log"; : > "$LOG"
if [ "${1:-}" = "--rehearse" ]; then DEV=cpu; REHEARSE=1; else DEV=cuda; REHEARSE=0; fi
export PYTHONUNBUFFERED=1 BENCH_DEV=$DEV BENCH_REHEARSE=$REHEARSE
TMP=$(mktemp -d)
say() { echo "$*" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT CMD...: runs CMD, keeps its output in the log, prints its last line
    local name=$1 t=$(( $2 * (REHEARSE ? 6 : 1) )); shift 2  # a loaded 2-core CPU is slow
    local t0=$(date +%s)
    timeout "$t" "$@" > "$TMP/$name.out" 2>&1; local rc=$?
    cat "$TMP/$name.out" >> "$LOG"
    say "[$name] rc=$rc $(( $(date +%s) - t0 ))s :: $(grep -E '^bench:|smoke' "$TMP/$name.out" | tail -1 || tail -1 "$TMP/$name.out")"
}
say "# bench_gpu.sh on $(hostname), $(date -u +%FT%TZ), device $DEV"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"

# ---- 1. smoke, bf16
for s in mae videomae mvit memvit vitdet tome revvit flip diffmae; do
    step "smoke_$s" 120 python3 $s.py --smoke --device $DEV --precision bf16 --out "$TMP/$s"
done

# ---- 2. the papers' benches (paper sizes on the GPU; the tiny or CPU fallbacks when rehearsing)
if [ $REHEARSE = 1 ]; then
    B_MAE="--model tiny"; B_VMAE="--model tiny"; B_MVIT=""; B_MEM=""; B_DET="--bench_model base --bench_size 256"
    B_TOME=""; B_REV="--batch_size 4"; B_FLIP="--model tiny"; B_DIFF="--model tiny --eval_images 8 --T 50 --sample_steps 10 --epochs 1"
    P=fp32
else
    B_MAE="--model large --bench_batch 64"; B_VMAE="--model large --batch_size 8"; B_MVIT=""; B_MEM=""
    B_DET="--bench_model base --bench_size 1024"; B_TOME="--model base --bench_batch 256"
    B_REV="--model base --batch_size 64 --input_size 224"; B_FLIP="--model large"; B_DIFF="--model tiny"
    P=bf16
fi
step bench_mae 150 python3 mae.py --bench $B_MAE --device $DEV --precision $P --out "$TMP/mae"
step bench_videomae 150 python3 videomae.py --bench $B_VMAE --device $DEV --precision $P --out "$TMP/videomae"
step bench_mvit 90 python3 mvit.py --bench $B_MVIT --device $DEV --precision $P --out "$TMP/mvit"
step bench_memvit 90 python3 memvit.py --bench $B_MEM --device $DEV --precision $P --out "$TMP/memvit"
step bench_vitdet 90 python3 vitdet.py --bench $B_DET --device $DEV --precision $P --out "$TMP/vitdet"
step bench_tome 120 python3 tome.py --bench $B_TOME --device $DEV --precision $P --out "$TMP/tome"
step bench_revvit 120 python3 revvit.py --bench $B_REV --device $DEV --precision $P --out "$TMP/revvit"
step bench_flip 120 python3 flip.py --bench $B_FLIP --device $DEV --precision $P --out "$TMP/flip"
step bench_diffmae 150 python3 diffmae.py --bench $B_DIFF --device $DEV --precision $P --out "$TMP/diffmae"

# ---- 3 and 4. MAE training throughput; peak memory of Rev-ViT and ViTDet
step throughput_memory 240 python3 - <<'EOF'
import os, time, torch
import mae, revvit, vitdet
dev, rehearse = os.environ["BENCH_DEV"], os.environ["BENCH_REHEARSE"] == "1"
cuda = dev == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
amp = torch.autocast(dev, dtype=torch.bfloat16)

def mae_throughput(name, batch, compile_):
    torch.manual_seed(0)
    model = mae.create_model(name).to(dev).train()
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), fused=cuda)
    S = mae.PRESETS[name]["img_size"]
    x = torch.randn(batch, 3, S, S, device=dev)
    def step():
        with amp:
            loss = fwd(x, 0.75)[0]
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3 if not compile_ else 5):
        step()
    sync(); t0, n = time.perf_counter(), 2 if rehearse else 20
    for _ in range(n):
        step()
    sync()
    return batch * n / (time.perf_counter() - t0)

names = [("tiny", 16)] if rehearse else [("base", 256), ("large", 128)]
for name, batch in names:
    for c in (False, True):
        if rehearse and c:
            continue  # compile on a 2-core CPU takes minutes; the GPU run measures it
        try:
            print(f"MAE-{name} pre-training, batch {batch}, bf16, compile={c}: "
                  f"{mae_throughput(name, batch, c):.0f} images/s", flush=True)
        except Exception as e:  # report and go on: the other figures still matter
            print(f"MAE-{name} compile={c}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)

def peak(fn):
    if not cuda:
        fn(); return float("nan")
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(); sync()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

B, S, D = (4, 32, 24) if rehearse else (64, 224, 24)
name = "tiny" if rehearse else "base"
for vanilla in (False, True):
    m = revvit.create_model(name, depth=D, img_size=S, num_classes=1000 if not rehearse else 6).to(dev).train()
    m.no_custom_backward = vanilla
    x = torch.randn(B, 3, S, S, device=dev); y = torch.randint(0, 6, (B,), device=dev)
    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
    step()
    print(f"Rev-ViT-{name} depth {D}, batch {B}, {S}px, {'vanilla' if vanilla else 'reversible'}: "
          f"peak {peak(step):.0f} MiB above the weights", flush=True)
    del m

S = 256 if rehearse else 1024
for glob in ((2, 5, 8, 11), tuple(range(12))):
    net = vitdet.create_model("base", global_block_indexes=glob, drop_path_rate=0.0).backbone.net.to(dev).train()
    x = torch.randn(1, 3, S, S, device=dev)
    def step():
        with amp:
            out = net(x)
        (sum(v.float().mean() for v in out.values()) if isinstance(out, dict) else out.float().mean()).backward()
    try:
        step()
        print(f"ViTDet-B backbone {S}px, batch 1, {'all global' if len(glob) == 12 else 'window + 4 global'}: "
              f"peak {peak(step):.0f} MiB above the weights", flush=True)
    except Exception as e:
        print(f"ViTDet-B {glob}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    del net
print("bench: throughput and memory done")
EOF
say "# done; full log in $LOG"
rm -rf "$TMP"
