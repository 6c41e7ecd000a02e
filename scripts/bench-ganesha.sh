# Sourced by the benchmark scripts, with $out (results folder) and $need (MiB of free space the run
# needs) set: checks the free space, makes the run's folder $work (removed at exit, with every
# process in $pids), starts nfs-ganesha on a throwaway export in it (its portmapper stub beside
# it) and sets $store to the export's store URL.
free=$(df -Pm target | awk 'NR==2 {print $4}')
if [ "$free" -lt "$need" ]; then
  echo "$(basename "$0"): needs ~${need} MiB free in target/, has ${free} MiB" >&2; exit 1
fi
work=$(mktemp -d "$PWD/$out/run.XXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nfs_port=$(free_port); mnt_port=$(free_port)
mkdir -p "$work/export"
cat > "$work/ganesha.conf" <<CONF
NFS_CORE_PARAM { Protocols = 3; NFS_Port = $nfs_port; MNT_Port = $mnt_port; Bind_Addr = 127.0.0.1;
  Enable_NLM = false; Enable_RQUOTA = false; mount_path_pseudo = true; }
NFS_KRB5 { Active_krb5 = false; }
EXPORT { Export_Id = 1; Path = $work/export; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash;
  SecType = sys; Protocols = 3; Transports = TCP; FSAL { Name = VFS; } }
CONF
python3 scripts/fake_rpcbind.py > "$work/rpcbind.log" 2>&1 & pids+=($!)
for _ in $(seq 200); do [ -S /run/rpcbind.sock ] && break; sleep 0.05; done
ganesha.nfsd -F -L "$work/ganesha.log" -f "$work/ganesha.conf" -p "$work/ganesha.pid" -N NIV_EVENT & pids+=($!)
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$mnt_port") 2>/dev/null && break; sleep 0.05; done
store="nfs://127.0.0.1:$nfs_port/export?mountport=$mnt_port"
