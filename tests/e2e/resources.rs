//! The resource updates Ansible's `cs_zone`, `cs_template`, `cs_iso` and `cs_instance_info` make
//! and read, through `cs` against a core on SQLite and on PostgreSQL: `updateZone`,
//! `updateTemplate`/`updateIso`, template and ISO permissions with sharing, and
//! `listVirtualMachines` over console targets; and that a second identical update changes nothing.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use crate::core_api::{Backend, Core};
use crate::support::errorcode;

crate::both_backends!(zone_and_template_updates, sharing_and_vms);

async fn zone_and_template_updates(backend: Backend) {
    let core = Core::start(backend).await;
    let zone = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let z = core
        .ok(&[
            "updateZone",
            &format!("id={zone}"),
            "name=seoul-1",
            "dns2=192.0.2.53",
            "ip6dns1=2001:db8::53",
            "domain=cloud.example",
            "allocationstate=Disabled",
        ])
        .await;
    let z = &z["zone"];
    assert_eq!(z["name"], "seoul-1", "{z}");
    assert_eq!(z["dns2"], "192.0.2.53");
    assert_eq!(z["ip6dns1"], "2001:db8::53");
    assert_eq!(z["domain"], "cloud.example");
    assert_eq!(z["allocationstate"], "Disabled");
    let listed = core.ok(&["listZones", "name=seoul-1"]).await;
    assert_eq!(listed["zone"][0]["ip6dns1"], "2001:db8::53", "{listed}");
    let bad = core
        .cs(&["updateZone", &format!("id={zone}"), "allocationstate=Sideways"])
        .await;
    assert_eq!(errorcode(&bad.json), Some(431), "{}", bad.json);

    core.ok(&[
        "addImageStore",
        "name=s",
        "url=nfs://192.0.2.10/export",
        "provider=NFS",
    ])
    .await;
    let os = core.ok(&["listOsTypes", "description=Debian GNU/Linux 12"]).await;
    let debian = os["ostype"][0]["id"].as_str().unwrap().to_owned();
    let t = core
        .ok(&[
            "registerTemplate",
            "name=deb",
            "format=QCOW2",
            "hypervisor=KVM",
            "url=http://192.0.2.20/deb.qcow2",
            "passwordenabled=true",
        ])
        .await;
    let tid = t["template"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(t["template"][0]["passwordenabled"], true, "{t}");
    let up = core
        .ok(&[
            "updateTemplate",
            &format!("id={tid}"),
            "displaytext=Debian 12",
            &format!("ostypeid={debian}"),
            "isdynamicallyscalable=true",
            "format=qcow2",
        ])
        .await;
    let u = &up["template"];
    assert_eq!(u["displaytext"], "Debian 12", "{up}");
    assert_eq!(u["ostypename"], "Debian GNU/Linux 12 (64-bit)");
    assert_eq!(u["isdynamicallyscalable"], true);
    assert_eq!(u["passwordenabled"], true, "kept");
    let bad = core
        .cs(&["updateTemplate", &format!("id={tid}"), "format=RAW"])
        .await;
    assert_eq!(errorcode(&bad.json), Some(431), "{}", bad.json);
    // The same update twice answers the same (what Ansible's second run compares).
    let again = core
        .ok(&[
            "updateTemplate",
            &format!("id={tid}"),
            "displaytext=Debian 12",
            &format!("ostypeid={debian}"),
        ])
        .await;
    for k in [
        "displaytext",
        "ostypeid",
        "isdynamicallyscalable",
        "passwordenabled",
        "format",
    ] {
        assert_eq!(again["template"][k], u[k], "{k}");
    }
    // Tags, as Ansible's ensure_tags sends them.
    core.ok(&[
        "createTags",
        &format!("resourceids={tid}"),
        "resourcetype=template",
        "tags[0].key=env",
        "tags[0].value=prod",
        "tags[1].key=team",
        "tags[1].value=infra",
    ])
    .await;
    let listed = core
        .ok(&["listTemplates", "templatefilter=self", &format!("id={tid}")])
        .await;
    let tags = listed["template"][0]["tags"].as_array().unwrap().clone();
    assert_eq!(tags.len(), 2, "{listed}");
    assert_eq!(tags[0]["key"], "env");
    assert_eq!(tags[0]["resourcetype"], "Template");
    let again = core
        .cs(&[
            "createTags",
            &format!("resourceids={tid}"),
            "resourcetype=Template",
            "tags[0].key=env",
            "tags[0].value=dev",
        ])
        .await;
    assert_eq!(errorcode(&again.json), Some(431), "{}", again.json);
    let empty = core
        .cs(&[
            "createTags",
            &format!("resourceids={tid}"),
            "resourcetype=Template",
            "tags[0].key=x",
            "tags[0].value=",
        ])
        .await;
    assert_eq!(errorcode(&empty.json), Some(431), "{}", empty.json);
    let lt = core
        .ok(&["listTags", &format!("resourceid={tid}"), "key=team"])
        .await;
    assert_eq!(lt["count"], 1, "{lt}");
    assert_eq!(lt["tag"][0]["value"], "infra");
    core.ok(&[
        "deleteTags",
        &format!("resourceids={tid}"),
        "resourcetype=Template",
        "tags[0].key=ENV",
    ])
    .await;
    let gone = core
        .cs(&[
            "deleteTags",
            &format!("resourceids={tid}"),
            "resourcetype=Template",
            "tags[0].key=env",
        ])
        .await;
    assert!(
        gone.json.to_string().contains("Unable to find any tags"),
        "{}",
        gone.json
    );
    let lt = core.ok(&["listTags", &format!("resourceid={tid}")]).await;
    assert_eq!(lt["count"], 1, "{lt}");

    let iso = core
        .ok(&["registerIso", "name=inst", "url=http://192.0.2.20/inst.iso"])
        .await;
    let iid = iso["iso"][0]["id"].as_str().unwrap().to_owned();
    let ui = core
        .ok(&[
            "updateIso",
            &format!("id={iid}"),
            "bootable=false",
            "name=installer",
        ])
        .await;
    assert_eq!(ui["iso"]["bootable"], false, "{ui}");
    assert_eq!(ui["iso"]["name"], "installer");
    // Ansible's cs_iso lists with isready=false: no readiness filter.
    let l = core
        .ok(&["listIsos", "isofilter=self", "isready=false", "name=installer"])
        .await;
    assert_eq!(l["count"], 1, "{l}");
}

async fn sharing_and_vms(backend: Backend) {
    let core = Core::start(backend).await;
    core.ok(&[
        "addImageStore",
        "name=s",
        "url=nfs://192.0.2.10/export",
        "provider=NFS",
    ])
    .await;
    let (_, _, ak, asec) = core.account("alice", "User").await;
    let (_, _, bk, bsec) = core.account("bob", "User").await;
    let (ok, t) = core
        .cs_with(
            &ak,
            &asec,
            &[
                "registerTemplate",
                "name=a1",
                "format=QCOW2",
                "hypervisor=KVM",
                "url=http://192.0.2.20/a1.qcow2",
            ],
        )
        .await;
    assert!(ok, "{t}");
    let tid = t["template"][0]["id"].as_str().unwrap().to_owned();
    // Bob sees nothing shared until Alice shares it; featuring is for admins.
    let (_, seen) = core
        .cs_with(
            &bk,
            &bsec,
            &["listTemplates", "templatefilter=self", &format!("id={tid}")],
        )
        .await;
    assert!(seen.get("template").is_none(), "{seen}");
    let (ok, v) = core
        .cs_with(
            &ak,
            &asec,
            &[
                "updateTemplatePermissions",
                &format!("id={tid}"),
                "isfeatured=true",
            ],
        )
        .await;
    assert!(!ok && errorcode(&v) == Some(531), "{v}");
    let (ok, v) = core
        .cs_with(
            &ak,
            &asec,
            &[
                "updateTemplatePermissions",
                &format!("id={tid}"),
                "accounts=bob",
                "op=add",
            ],
        )
        .await;
    assert!(ok, "{v}");
    assert_eq!(v["success"], true);
    let perms = core.ok(&["listTemplatePermissions", &format!("id={tid}")]).await;
    let p = &perms["templatepermission"];
    assert_eq!(p["account"][0], "bob", "{perms}");
    assert_eq!(p["ispublic"], false);
    // Shared with bob: `sharedexecutable` lists it once ready (not yet), `all` never for a user;
    // bob cannot change it.
    let (ok, v) = core
        .cs_with(
            &bk,
            &bsec,
            &["updateTemplate", &format!("id={tid}"), "displaytext=mine"],
        )
        .await;
    assert!(!ok && errorcode(&v) == Some(531), "{v}");
    let (ok, v) = core
        .cs_with(
            &ak,
            &asec,
            &["updateTemplatePermissions", &format!("id={tid}"), "op=reset"],
        )
        .await;
    assert!(ok, "{v}");
    let perms = core.ok(&["listTemplatePermissions", &format!("id={tid}")]).await;
    assert!(perms["templatepermission"].get("account").is_none(), "{perms}");
    let bad = core
        .cs(&[
            "updateTemplatePermissions",
            &format!("id={tid}"),
            "accounts=nobody",
            "op=add",
        ])
        .await;
    assert_eq!(errorcode(&bad.json), Some(431), "{}", bad.json);
    // ISO permissions answer under CloudStack's template key.
    let iso = core
        .ok(&["registerIso", "name=i1", "url=http://192.0.2.20/i1.iso"])
        .await;
    let iid = iso["iso"][0]["id"].as_str().unwrap().to_owned();
    core.ok(&["updateIsoPermissions", &format!("id={iid}"), "ispublic=true"])
        .await;
    let (ok, raw) = core.cs_raw(&["listIsoPermissions", &format!("id={iid}")]).await;
    assert!(ok, "{raw}");
    assert_eq!(raw["templatepermission"]["ispublic"], true, "{raw}");

    // listVirtualMachines: the console targets, each with what cs_instance_info needs.
    let target = core
        .ok(&["addConsoleTarget", "name=web-1", "host=192.0.2.30", "port=5901"])
        .await;
    let vid = target["consoletarget"]["id"].as_str().unwrap().to_owned();
    let vms = core.ok(&["listVirtualMachines", "listall=true"]).await;
    let vm = &vms["virtualmachine"][0];
    assert_eq!(vm["id"], vid.as_str(), "{vms}");
    for k in [
        "name",
        "displayname",
        "id",
        "state",
        "zonename",
        "account",
        "domain",
    ] {
        assert!(vm.get(k).is_some_and(|v| !v.is_null()), "{k}: {vms}");
    }
    assert!(vm.get("host").is_none() && vm.get("password").is_none(), "{vms}");
    let vols = core
        .ok(&["listVolumes", &format!("virtualmachineid={vid}")])
        .await;
    assert!(vols.get("volume").is_none(), "{vols}");
    // A system VM's console: CloudStack's success:false with why, when its driver gives none
    // (here: registered by hand); not found for a user.
    let svm = core.ok(&["registerSystemVm", "role=consoleproxy"]).await;
    let svm_id = svm["systemvm"]["id"].as_str().unwrap().to_owned();
    let ce = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={svm_id}")])
        .await;
    assert_eq!(ce["consoleendpoint"]["success"], false, "{ce}");
    assert!(
        ce["consoleendpoint"]["details"]
            .as_str()
            .unwrap()
            .contains("not deployed by core"),
        "{ce}"
    );
    let (ok, v) = core
        .cs_with(
            &ak,
            &asec,
            &["createConsoleEndpoint", &format!("virtualmachineid={svm_id}")],
        )
        .await;
    assert!(!ok && errorcode(&v) == Some(431), "{v}");
    // A user sees no one else's VMs.
    let (ok, v) = core
        .cs_with(&ak, &asec, &["listVirtualMachines", "listall=true"])
        .await;
    assert!(ok && v.get("virtualmachine").is_none(), "{v}");
}
