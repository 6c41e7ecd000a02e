# Sourced by the benchmark scripts: starts nfs-ganesha on a throwaway export under $work (its
# portmapper stub beside it) and sets $store to the export's store URL. The caller's EXIT trap
# kills what is in $pids and removes $work.
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
