//! Primary storage and volumes through `cs`, on SQLite and on PostgreSQL: `createStoragePool`
//! (NFS only), `listStoragePools` (and the dashboard's count), `importVolume` (a path inside the
//! pool, once), `listVolumes` by owner and filters, `unmanageVolume`, `deleteStoragePool` refused
//! while it holds volumes, and the refusals with CloudStack's codes.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use crate::core_api::{Backend, Core};
use crate::support::errorcode;

crate::both_backends!(pools_and_volumes);

async fn pools_and_volumes(backend: Backend) {
    let core = Core::start(backend).await;
    let zone = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pool = core
        .ok(&[
            "createStoragePool",
            "name=primary-1",
            "url=nfs://192.0.2.10/export/primary",
            &format!("zoneid={zone}"),
            "scope=zone",
        ])
        .await;
    let p = &pool["storagepool"];
    assert_eq!(p["type"], "NetworkFilesystem", "{p}");
    assert_eq!(p["ipaddress"], "192.0.2.10");
    assert_eq!(p["path"], "/export/primary");
    assert_eq!(p["state"], "Up");
    let pool_id = p["id"].as_str().unwrap().to_owned();
    for (args, code) in [
        (vec!["name=x", "url=file:///srv/x"], 431),
        (vec!["name=primary-1", "url=nfs://192.0.2.11/e"], 431),
    ] {
        let mut all = vec!["createStoragePool".to_owned(), format!("zoneid={zone}")];
        all.extend(args.into_iter().map(str::to_owned));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let o = core.cs(&refs).await;
        assert_eq!(errorcode(&o.json), Some(code), "{refs:?}: {}", o.json);
    }
    let listed = core.ok(&["listStoragePools", &format!("zoneid={zone}")]).await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(
        core.ok(&["listInfrastructure"]).await["infrastructure"]["storagepools"],
        1
    );

    let v = core
        .ok(&[
            "importVolume",
            "path=vm-1/root.qcow2",
            &format!("storageid={pool_id}"),
            "size=8589934592",
        ])
        .await;
    let v = &v["volume"];
    assert_eq!(v["name"], "root.qcow2", "{v}");
    assert_eq!(v["size"], 8_589_934_592_i64);
    assert_eq!(v["storage"], "primary-1");
    assert_eq!(v["format"], "QCOW2");
    let vol = v["id"].as_str().unwrap().to_owned();
    for (args, code) in [
        (vec!["path=vm-1/root.qcow2", "size=1"], 431),
        (vec!["path=../etc/passwd", "size=1"], 431),
        (vec!["path=/abs.qcow2", "size=1"], 431),
        (vec!["path=x.vmdk", "size=1", "format=VMDK"], 431),
    ] {
        let mut all = vec!["importVolume".to_owned(), format!("storageid={pool_id}")];
        all.extend(args.into_iter().map(str::to_owned));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let o = core.cs(&refs).await;
        assert_eq!(errorcode(&o.json), Some(code), "{refs:?}: {}", o.json);
    }
    let o = core
        .cs(&[
            "importVolume",
            "path=y.qcow2",
            "size=1",
            "storageid=00000000-0000-4000-8000-000000000000",
        ])
        .await;
    assert_eq!(errorcode(&o.json), Some(431), "{}", o.json);

    let all = core.ok(&["listVolumes", "listall=true"]).await;
    assert_eq!(all["count"], 1, "{all}");
    assert_eq!(all["volume"][0]["id"], vol.as_str());
    assert_eq!(
        core.ok(&["listVolumes", &format!("storageid={pool_id}")]).await["count"],
        1
    );
    // Ansible's cs_instance_info asks for a VM's volumes: imported ones are attached to none.
    let by_vm = core
        .ok(&[
            "listVolumes",
            "virtualmachineid=00000000-0000-4000-8000-000000000000",
        ])
        .await;
    assert!(by_vm.get("volume").is_none(), "{by_vm}");

    // A pool with a volume stays; unmanaged, it goes.
    let o = core.cs(&["deleteStoragePool", &format!("id={pool_id}")]).await;
    assert_eq!(errorcode(&o.json), Some(536), "{}", o.json);
    core.ok(&["unmanageVolume", &format!("id={vol}")]).await;
    assert!(core.ok(&["listVolumes"]).await.get("volume").is_none());
    core.ok(&["deleteStoragePool", &format!("id={pool_id}")]).await;
    assert_eq!(
        core.ok(&["listStoragePools"]).await["count"]
            .as_i64()
            .unwrap_or(0),
        0
    );
}
