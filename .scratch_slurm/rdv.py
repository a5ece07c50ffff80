import os, socket, subprocess, sys, time
rank = int(os.environ["SLURM_PROCID"]); world = int(os.environ["SLURM_NTASKS"])
master = subprocess.check_output(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], text=True).split()[0]
addr = socket.gethostbyname(master)
port = 29500 + int(os.environ["SLURM_JOB_ID"]) % 1000   # per-job port
if rank == 0:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port)); s.listen(world)
    peers = []
    for _ in range(world - 1):
        c, _ = s.accept(); peers.append(int(c.recv(64).decode())); c.sendall(b"ok from 0"); c.close()
    print(f"rank0 master={master}({addr}):{port} got ranks {sorted(peers)}", flush=True)
else:
    for i in range(100):
        try:
            c = socket.create_connection((addr, port), timeout=2); break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(f"rank{rank}: could not connect")
    c.sendall(str(rank).encode()); print(f"rank{rank} got {c.recv(64).decode()!r}", flush=True)
