//! The user directory and what the stock UI and Ansible read, through `cs` and raw HTTP against a
//! core on SQLite and on PostgreSQL: domains, accounts, users, the eight roles (a matrix of
//! allowed and refused commands, a Domain Admin kept inside its domain), the root admin's
//! password, `login`'s fields, the failed-login lockout, the pre-shared-key login, and the UI's
//! login and first-load sequence.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use serde_json::Value;
use systemvm_core::signing::{Encoding, sign, string_to_sign};

use crate::core_api::{Backend, Core, enc};
use crate::support::errorcode;

crate::both_backends!(
    domains_accounts_users,
    role_matrix,
    login_lockout_and_sso,
    ui_first_load,
    api_shapes
);

/// The root admin's password from `credentials.json`.
fn admin_password(core: &Core) -> String {
    let text = std::fs::read_to_string(&core.running().credentials_path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["username"], "admin", "{v}");
    v["password"]
        .as_str()
        .expect("a password in credentials.json")
        .to_owned()
}

/// POSTs a `login` form; returns (status, JSON).
async fn login_form(core: &Core, fields: &[(&str, &str)]) -> (u16, Value) {
    let body = fields
        .iter()
        .map(|(n, v)| format!("{}={}", enc(n), enc(v)))
        .collect::<Vec<_>>()
        .join("&");
    let r = core.raw("POST", "", body.as_bytes(), None).await;
    (r.status, r.json)
}

async fn domains_accounts_users(backend: Backend) {
    let core = Core::start(backend).await;
    // ROOT exists; a tree below it.
    let root = core.ok(&["listDomains", "listall=true"]).await;
    assert_eq!(root["count"], 1, "{root}");
    assert_eq!(root["domain"][0]["path"], "ROOT");
    assert_eq!(root["domain"][0]["level"], 0);
    let sales = core.ok(&["createDomain", "name=Sales"]).await["domain"].clone();
    let sales_id = sales["id"].as_str().unwrap().to_owned();
    assert_eq!(sales["path"], "ROOT/Sales", "{sales}");
    assert_eq!(sales["parentdomainname"], "ROOT");
    let eu = core
        .ok(&["createDomain", "name=EU", &format!("parentdomainid={sales_id}")])
        .await["domain"]
        .clone();
    assert_eq!(eu["path"], "ROOT/Sales/EU");
    assert_eq!(eu["level"], 2);
    let dup = core.cs(&["createDomain", "name=sales"]).await;
    assert_eq!(
        errorcode(&dup.json),
        Some(431),
        "siblings differ ignoring case: {}",
        dup.json
    );
    let bad = core.cs(&["createDomain", "name=a/b"]).await;
    assert_eq!(errorcode(&bad.json), Some(431), "{}", bad.json);
    // A rename moves the subtree's paths.
    let renamed = core
        .ok(&["updateDomain", &format!("id={sales_id}"), "name=Market"])
        .await;
    assert_eq!(renamed["domain"]["path"], "ROOT/Market");
    let eu_now = core
        .ok(&["listDomains", &format!("id={}", eu["id"].as_str().unwrap())])
        .await;
    assert_eq!(eu_now["domain"][0]["path"], "ROOT/Market/EU", "{eu_now}");
    let children = core.ok(&["listDomainChildren", &format!("id={sales_id}")]).await;
    assert_eq!(children["count"], 1, "{children}");
    let market = core.ok(&["listDomains", &format!("id={sales_id}")]).await;
    assert_eq!(market["domain"][0]["haschild"], true);

    // An account in the domain with the Domain Admin role, and a second user of it.
    let roles = core.ok(&["listRoles"]).await;
    assert_eq!(roles["count"], 8, "{roles}");
    let role_id = |name: &str| -> String {
        roles["role"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no role {name}: {roles}"))["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let a = core
        .ok(&[
            "createAccount",
            "username=dadmin",
            "password=Secret pass 1",
            "email=d@example.org",
            "firstname=Dom",
            "lastname=Admin",
            &format!("roleid={}", role_id("Domain Admin")),
            &format!("domainid={sales_id}"),
            "timezone=Asia/Seoul",
        ])
        .await["account"]
        .clone();
    assert_eq!(a["accounttype"], 2, "{a}");
    assert_eq!(a["roletype"], "DomainAdmin");
    assert_eq!(a["rolename"], "Domain Admin");
    assert_eq!(a["domainpath"], "ROOT/Market");
    assert_eq!(a["state"], "enabled");
    let account_id = a["id"].as_str().unwrap().to_owned();
    let u = core
        .ok(&[
            "createUser",
            "account=dadmin",
            &format!("domainid={sales_id}"),
            "username=dadmin2",
            "password=Other pass 2",
            "email=d2@example.org",
            "firstname=Second",
            "lastname=User",
        ])
        .await["user"]
        .clone();
    let user_id = u["id"].as_str().unwrap().to_owned();
    assert_eq!(u["accountid"], account_id.as_str());
    assert_eq!(u["usersource"], "native");
    // Keys: listUsers shows the API key once there is one, never the secret; getUserKeys does.
    core.ok(&["registerUserKeys", &format!("id={user_id}")]).await;
    let listed = core.ok(&["listUsers", &format!("id={user_id}")]).await;
    assert!(listed["user"][0]["apikey"].is_string(), "{listed}");
    assert!(listed["user"][0].get("secretkey").is_none(), "{listed}");
    let keys = core.ok(&["getUserKeys", &format!("id={user_id}")]).await;
    assert!(keys["userkeys"]["secretkey"].is_string(), "{keys}");
    // Update, disable (async), enable, lock; delete.
    let up = core
        .ok(&[
            "updateUser",
            &format!("id={user_id}"),
            "firstname=Renamed",
            "timezone=UTC",
        ])
        .await;
    assert_eq!(up["user"]["firstname"], "Renamed");
    assert_eq!(up["user"]["timezone"], "UTC");
    let d = core.ok(&["disableUser", &format!("id={user_id}")]).await;
    assert_eq!(d["user"]["state"], "disabled", "{d}");
    let e = core.ok(&["enableUser", &format!("id={user_id}")]).await;
    assert_eq!(e["user"]["state"], "enabled");
    let l = core.ok(&["lockUser", &format!("id={user_id}")]).await;
    assert_eq!(l["user"]["state"], "locked");
    core.ok(&["deleteUser", &format!("id={user_id}")]).await;
    let gone = core.ok(&["listUsers", &format!("id={user_id}")]).await;
    assert!(gone.get("user").is_none(), "{gone}");

    // Account states, by id and by name + domain.
    let dis = core
        .ok(&[
            "disableAccount",
            "account=dadmin",
            &format!("domainid={sales_id}"),
            "lock=false",
        ])
        .await;
    assert_eq!(dis["account"]["state"], "disabled", "{dis}");
    let en = core.ok(&["enableAccount", &format!("id={account_id}")]).await;
    assert_eq!(en["account"]["state"], "enabled");
    let lk = core
        .ok(&["disableAccount", &format!("id={account_id}"), "lock=true"])
        .await;
    assert_eq!(lk["account"]["state"], "locked");
    let upd = core
        .ok(&["updateAccount", &format!("id={account_id}"), "newname=dadmins"])
        .await;
    assert_eq!(upd["account"]["name"], "dadmins");
    // A role of another type is refused; the root admin account is protected.
    let wrong = core
        .cs(&[
            "updateAccount",
            &format!("id={account_id}"),
            &format!("roleid={}", role_id("User")),
        ])
        .await;
    assert_eq!(errorcode(&wrong.json), Some(431), "{}", wrong.json);
    let admin_acct = core.ok(&["listAccounts", "name=admin"]).await["account"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let no = core
        .cs(&["disableAccount", &format!("id={admin_acct}"), "lock=true"])
        .await;
    assert_eq!(errorcode(&no.json), Some(531), "{}", no.json);

    // Deleting a domain: ROOT never; one with accounts only with cleanup.
    let r = core
        .cs(&["deleteDomain", "id=00000000-0000-4000-8000-000000000001"])
        .await;
    assert_eq!(errorcode(&r.json), Some(531), "{}", r.json);
    let r = core.cs(&["deleteDomain", &format!("id={sales_id}")]).await;
    assert!(!r.ok, "{}", r.json);
    assert!(
        r.json.to_string().contains("Delete failed on domain"),
        "{}",
        r.json
    );
    core.ok(&["deleteDomain", &format!("id={sales_id}"), "cleanup=true"])
        .await;
    let left = core.ok(&["listDomains", "listall=true"]).await;
    assert_eq!(left["count"], 1, "{left}");
    let acc = core.ok(&["listAccounts", &format!("id={account_id}")]).await;
    assert!(acc.get("account").is_none(), "{acc}");
}

async fn role_matrix(backend: Backend) {
    let core = Core::start(backend).await;
    let roles = core.ok(&["listRoles"]).await;
    let role_id = |name: &str| -> String {
        roles["role"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let east = core.ok(&["createDomain", "name=East"]).await["domain"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let west = core.ok(&["createDomain", "name=West"]).await["domain"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // One account per role (Admin types in ROOT, the others in East), each with keys.
    let mut keys = std::collections::HashMap::new();
    for (n, role) in [
        "Resource Admin",
        "Domain Admin",
        "User",
        "Read-Only Admin - Default",
        "Read-Only User - Default",
        "Support Admin - Default",
        "Support User - Default",
    ]
    .into_iter()
    .enumerate()
    {
        let admin_type = role.contains("Admin - Default");
        let domain = if admin_type {
            "00000000-0000-4000-8000-000000000001"
        } else {
            east.as_str()
        };
        let a = core
            .ok(&[
                "createAccount",
                &format!("username=r{n}"),
                "password=Pass word 9",
                &format!("email=r{n}@example.org"),
                "firstname=R",
                "lastname=M",
                &format!("roleid={}", role_id(role)),
                &format!("domainid={domain}"),
            ])
            .await;
        assert_eq!(a["account"]["rolename"], role, "{a}");
        let uid = a["account"]["user"][0]["id"].as_str().unwrap().to_owned();
        let k = core.ok(&["registerUserKeys", &format!("id={uid}")]).await;
        keys.insert(
            role,
            (
                k["userkeys"]["apikey"].as_str().unwrap().to_owned(),
                k["userkeys"]["secretkey"].as_str().unwrap().to_owned(),
            ),
        );
    }
    // The matrix: what listApis shows each role, which is exactly what it may call.
    let allowed = |(k, s): &(String, String)| {
        let (k, s) = (k.clone(), s.clone());
        let core = &core;
        async move {
            let (ok, v) = core.cs_with(&k, &s, &["listApis"]).await;
            assert!(ok, "{v}");
            v["api"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["name"].as_str().unwrap().to_owned())
                .collect::<std::collections::HashSet<String>>()
        }
    };
    let expect: &[(&str, &[&str], &[&str])] = &[
        (
            "Resource Admin",
            &[
                "listSystemVms",
                "stopSystemVm",
                "createAccount",
                "listDomains",
                "registerTemplate",
            ],
            &[
                "createZone",
                "updateConfiguration",
                "createDomain",
                "listRolePermissions",
            ],
        ),
        (
            "Domain Admin",
            &[
                "createAccount",
                "createUser",
                "createDomain",
                "listDomains",
                "registerTemplate",
            ],
            &[
                "listSystemVms",
                "createZone",
                "updateConfiguration",
                "updateDomain",
            ],
        ),
        (
            "User",
            &[
                "listTemplates",
                "registerTemplate",
                "deleteTemplate",
                "updateUser",
                "listOsTypes",
            ],
            &[
                "createAccount",
                "listDomains",
                "listSystemVms",
                "listConfigurations",
            ],
        ),
        (
            "Read-Only Admin - Default",
            &[
                "listSystemVms",
                "listAccounts",
                "listConfigurations",
                "getUserKeys",
                "queryAsyncJobResult",
            ],
            &["registerTemplate", "stopSystemVm", "createAccount", "updateUser"],
        ),
        (
            "Read-Only User - Default",
            &["listTemplates", "listZones", "queryAsyncJobResult"],
            &[
                "registerTemplate",
                "deleteTemplate",
                "updateUser",
                "registerUserKeys",
            ],
        ),
        (
            "Support Admin - Default",
            &[
                "startSystemVm",
                "stopSystemVm",
                "rebootSystemVm",
                "registerIso",
                "listAccounts",
            ],
            &[
                "destroySystemVm",
                "createAccount",
                "deleteTemplate",
                "deleteAccount",
            ],
        ),
        (
            "Support User - Default",
            &["registerTemplate", "listTemplates", "queryAsyncJobResult"],
            &["deleteTemplate", "stopSystemVm", "createAccount", "updateUser"],
        ),
    ];
    for (role, yes, no) in expect {
        let apis = allowed(&keys[role]).await;
        for c in *yes {
            assert!(apis.contains(*c), "{role} may call {c}");
        }
        for c in *no {
            assert!(!apis.contains(*c), "{role} may not call {c}");
        }
    }
    // A refused command answers 432, like CloudStack's dynamic roles.
    let (k, s) = &keys["Read-Only Admin - Default"];
    let (ok, v) = core
        .cs_with(k, s, &["registerIso", "name=x", "url=http://192.0.2.1/x.iso"])
        .await;
    assert!(!ok);
    assert_eq!(errorcode(&v), Some(432), "{v}");
    let (k, s) = &keys["Support Admin - Default"];
    let (ok, v) = core.cs_with(k, s, &["listSystemVms"]).await;
    assert!(ok, "{v}");

    // A Domain Admin acts inside its domain tree only.
    let (k, s) = &keys["Domain Admin"];
    let (ok, seen) = core.cs_with(k, s, &["listAccounts", "listall=true"]).await;
    assert!(ok, "{seen}");
    for a in seen["account"].as_array().unwrap() {
        assert_eq!(
            a["domainpath"], "ROOT/East",
            "a Domain Admin sees outside East: {seen}"
        );
    }
    let (ok, v) = core
        .cs_with(
            k,
            s,
            &[
                "createAccount",
                "username=westie",
                "password=Pass word 9",
                "email=w@example.org",
                "firstname=W",
                "lastname=W",
                &format!("domainid={west}"),
            ],
        )
        .await;
    assert!(!ok, "created an account in another domain: {v}");
    assert_eq!(errorcode(&v), Some(431), "{v}");
    let (ok, v) = core
        .cs_with(
            k,
            s,
            &[
                "createAccount",
                "username=eastie",
                "password=Pass word 9",
                "email=e@example.org",
                "firstname=E",
                "lastname=E",
                &format!("domainid={east}"),
            ],
        )
        .await;
    assert!(ok, "{v}");
    // It may not grant an Admin role, nor see the ROOT-domain accounts' users.
    let (ok, v) = core
        .cs_with(
            k,
            s,
            &[
                "createAccount",
                "username=boss",
                "password=Pass word 9",
                "email=b@example.org",
                "firstname=B",
                "lastname=B",
                &format!("roleid={}", role_id("Root Admin")),
            ],
        )
        .await;
    assert!(!ok, "{v}");
    assert_eq!(errorcode(&v), Some(531), "{v}");
    let (ok, users) = core.cs_with(k, s, &["listUsers", "listall=true"]).await;
    assert!(ok, "{users}");
    assert!(
        users["user"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["domain"] == "East"),
        "{users}"
    );
    let (_, doms) = core.cs_with(k, s, &["listDomains", "listall=true"]).await;
    assert_eq!(doms["count"], 1, "only its own subtree: {doms}");
    // A Domain Admin sees and manages the templates of its domain's accounts.
    core.ok(&[
        "addImageStore",
        "name=s",
        "url=nfs://192.0.2.10/export",
        "provider=NFS",
    ])
    .await;
    let (uk, us) = &keys["User"];
    let (ok, t) = core
        .cs_with(
            uk,
            us,
            &[
                "registerTemplate",
                "name=east-t",
                "format=QCOW2",
                "hypervisor=KVM",
                "url=http://192.0.2.20/e.qcow2",
            ],
        )
        .await;
    assert!(ok, "{t}");
    let tid = t["template"][0]["id"].as_str().unwrap().to_owned();
    let (ok, seen) = core
        .cs_with(
            k,
            s,
            &["listTemplates", "templatefilter=self", &format!("id={tid}")],
        )
        .await;
    assert!(
        ok && seen["count"] == 1,
        "the Domain Admin does not see its user's template: {seen}"
    );
    let (ok, v) = core
        .cs_with(
            k,
            s,
            &[
                "updateTemplate",
                &format!("id={tid}"),
                "displaytext=by the domain admin",
            ],
        )
        .await;
    assert!(ok, "{v}");
    let (rk, rs) = &keys["Support User - Default"];
    let (ok, _) = core
        .cs_with(
            rk,
            rs,
            &["updateTemplate", &format!("id={tid}"), "displaytext=no"],
        )
        .await;
    assert!(!ok);
    // A user sees itself only.
    let (k, s) = &keys["User"];
    let (ok, v) = core.cs_with(k, s, &["listUsers", "listall=true"]).await;
    assert!(ok && v["count"] == 1, "{v}");
    // listRolePermissions: the read-only roles end with a deny-all rule.
    let perms = core
        .ok(&[
            "listRolePermissions",
            &format!("roleid={}", role_id("Read-Only User - Default")),
        ])
        .await;
    let rules = perms["rolepermission"].as_array().unwrap();
    assert_eq!(rules.last().unwrap()["rule"], "*");
    assert_eq!(rules.last().unwrap()["permission"], "deny");
}

async fn login_lockout_and_sso(backend: Backend) {
    let core = Core::start(backend).await;
    // The root admin logs in with the password from credentials.json; every field the UI stores.
    let password = admin_password(&core);
    let (status, v) = login_form(
        &core,
        &[
            ("command", "login"),
            ("username", "admin"),
            ("password", &password),
            ("domain", "/"),
            ("response", "json"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let l = &v["loginresponse"];
    for f in [
        "username",
        "userid",
        "domainid",
        "timeout",
        "account",
        "type",
        "firstname",
        "lastname",
        "registered",
        "sessionkey",
        "issuerfor2fa",
        "providerfor2fa",
        "is2faenabled",
        "is2faverified",
        "managementserverid",
    ] {
        assert!(l.get(f).is_some(), "login lacks {f}: {v}");
    }
    assert_eq!(l["type"], "1");
    assert!(l["timeout"].is_u64());
    assert_eq!(l["is2faenabled"], "false");

    // A user is disabled after incorrect.login.attempts.allowed wrong passwords; the root admin never.
    core.ok(&[
        "updateConfiguration",
        "name=incorrect.login.attempts.allowed",
        "value=3",
    ])
    .await;
    core.account("clumsy", "User").await;
    for _ in 0..3 {
        let (status, v) = login_form(
            &core,
            &[
                ("command", "login"),
                ("username", "clumsy"),
                ("password", "wrong"),
            ],
        )
        .await;
        assert_eq!(status, 531, "{v}");
    }
    let (status, v) = login_form(
        &core,
        &[
            ("command", "login"),
            ("username", "clumsy"),
            ("password", "Pa ss~word1"),
        ],
    )
    .await;
    assert_eq!(status, 531, "{v}");
    assert!(v.to_string().contains("disabled/locked"), "{v}");
    let u = core.ok(&["listUsers", "username=clumsy"]).await;
    assert_eq!(u["user"][0]["state"], "disabled", "{u}");
    let id = u["user"][0]["id"].as_str().unwrap().to_owned();
    core.ok(&["enableUser", &format!("id={id}")]).await;
    let (status, v) = login_form(
        &core,
        &[
            ("command", "login"),
            ("username", "clumsy"),
            ("password", "Pa ss~word1"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for _ in 0..4 {
        login_form(
            &core,
            &[("command", "login"), ("username", "admin"), ("password", "wrong")],
        )
        .await;
    }
    let (status, _) = login_form(
        &core,
        &[
            ("command", "login"),
            ("username", "admin"),
            ("password", &password),
        ],
    )
    .await;
    assert_eq!(status, 200, "the root admin was locked out");

    // The root admin changes its password (no current password needed); the old one stops working.
    let admin_user = core.ok(&["listUsers", "username=admin"]).await["user"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    core.ok(&[
        "updateUser",
        &format!("id={admin_user}"),
        "password=New root pass 7",
    ])
    .await;
    let (status, _) = login_form(
        &core,
        &[
            ("command", "login"),
            ("username", "admin"),
            ("password", &password),
        ],
    )
    .await;
    assert_eq!(status, 531);
    let (status, _) = login_form(
        &core,
        &[
            ("command", "login"),
            ("username", "admin"),
            ("password", "New root pass 7"),
        ],
    )
    .await;
    assert_eq!(status, 200);

    // Single sign-on: off until the key is set; then a good signature logs in once.
    let sso = |key: &str, ts: i64| -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = [
            ("command", "login".to_owned()),
            ("username", "clumsy".to_owned()),
            ("domainid", "00000000-0000-4000-8000-000000000001".to_owned()),
            ("timestamp", ts.to_string()),
            ("response", "json".to_owned()),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        let sig = sign(key, &string_to_sign(&p, Encoding::Java));
        p.push(("signature".into(), sig));
        p
    };
    let send = |p: Vec<(String, String)>| {
        let core = &core;
        async move {
            let fields: Vec<(&str, &str)> = p.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            login_form(core, &fields).await
        }
    };
    let now = || {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    };
    let (status, _) = send(sso("psk-1234", now())).await;
    assert_eq!(status, 531, "single sign-on works without a key set");
    core.ok(&[
        "updateConfiguration",
        "name=security.singlesignon.key",
        "value=psk-1234",
    ])
    .await;
    let listed = core
        .ok(&["listConfigurations", "name=security.singlesignon.key"])
        .await;
    assert_eq!(
        listed["configuration"][0]["value"], "********",
        "the key is listed: {listed}"
    );
    let good = sso("psk-1234", now());
    let (status, v) = send(good.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["loginresponse"]["username"], "clumsy");
    let (status, _) = send(good).await;
    assert_eq!(status, 531, "a replayed signature logged in");
    let (status, _) = send(sso("other-key", now())).await;
    assert_eq!(status, 531, "a wrong key logged in");
    let (status, _) = send(sso("psk-1234", now() - 3_600_000)).await;
    assert_eq!(status, 531, "a stale timestamp logged in");
    // The stored value is sealed: the database holds no plaintext key.
    if let Backend::Sqlite = backend {
        let dir = core.running().credentials_path.parent().unwrap().to_owned();
        for f in ["core.db", "core.db-wal"] {
            let raw = std::fs::read(dir.join(f)).unwrap_or_default();
            assert!(
                !raw.windows(8).any(|w| w == b"psk-1234"),
                "the key is in {f} in clear"
            );
        }
    }
}

/// The stock UI's login page and first load, in its order (cloudstack-clients.md), with a session.
async fn ui_first_load(backend: Backend) {
    let core = Core::start(backend).await;
    // The login page's calls answer without a session.
    for (cmd, key) in [
        ("listGuiThemes", "listguithemesresponse"),
        ("listIdps", "listidpsresponse"),
        ("listOauthProvider", "listoauthproviderresponse"),
    ] {
        let r = core
            .raw("GET", &format!("command={cmd}&response=json"), b"", None)
            .await;
        assert_eq!(r.status, 200, "{cmd}: {}", r.json);
        assert!(r.json.get(key).is_some(), "{cmd}: {}", r.json);
    }
    let (cookie, skey) = core.login("admin", &admin_password(&core)).await;
    for (cmd, key) in [
        ("listZones", "listzonesresponse"),
        ("listUsers&showicon=true", "listusersresponse"),
        ("listApis", "listapisresponse"),
        ("listCapabilities", "listcapabilitiesresponse"),
        ("listLdapConfigurations", "ldapconfigurationresponse"),
        ("listGuiThemes", "listguithemesresponse"),
        ("listAlerts", "listalertsresponse"),
        ("listEvents", "listeventsresponse"),
        ("listCapacity", "listcapacityresponse"),
        ("listPods", "listpodsresponse"),
        ("listClusters", "listclustersresponse"),
        ("listHosts", "listhostsresponse"),
        ("listStoragePools", "liststoragepoolsresponse"),
        ("listSystemVms", "listsystemvmsresponse"),
        ("listRouters", "listroutersresponse"),
        ("listInfrastructure", "listinfrastructureresponse"),
        ("listZonesMetrics", "listzonesmetricsresponse"),
        ("listOsTypes", "listostypesresponse"),
        ("listOsCategories", "listoscategoriesresponse"),
        ("listHypervisors", "listhypervisorsresponse"),
        ("listStorageProviders&type=image", "liststorageprovidersresponse"),
        ("listDomains&listall=true", "listdomainsresponse"),
        ("listRoles", "listrolesresponse"),
    ] {
        let (status, v) = core.with_session(&cookie, &skey, cmd).await;
        assert_eq!(status, 200, "{cmd}: {v}");
        let inner = v.get(key).unwrap_or_else(|| panic!("{cmd}: no {key}: {v}"));
        assert!(inner.get("errorcode").is_none(), "{cmd}: {v}");
    }
    // Shapes the clients read.
    let (_, caps) = core.with_session(&cookie, &skey, "listCapabilities").await;
    let c = &caps["listcapabilitiesresponse"]["capability"];
    assert_eq!(c["cloudstackversion"], "4.22.0.0");
    assert!(c["defaultuipagesize"].is_i64(), "{caps}");
    let (_, sp) = core
        .with_session(&cookie, &skey, "listStorageProviders&type=image")
        .await;
    assert_eq!(
        sp["liststorageprovidersresponse"]["dataStoreProvider"][0]["name"],
        "NFS"
    );
    let (_, infra) = core.with_session(&cookie, &skey, "listInfrastructure").await;
    assert_eq!(
        infra["listinfrastructureresponse"]["infrastructure"]["zones"], 1,
        "{infra}"
    );
    // Menus are gated on listApis: the entries the UI looks for are there.
    let (_, apis) = core.with_session(&cookie, &skey, "listApis").await;
    let names: Vec<&str> = apis["listapisresponse"]["api"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    for n in [
        "listInfrastructure",
        "listZonesMetrics",
        "listConfigurations",
        "listSystemVms",
        "createConsoleEndpoint",
        "listOsTypes",
    ] {
        assert!(names.contains(&n), "listApis lacks {n}");
    }
    // The OS catalogue: registerTemplate validates ostypeid and answers ostypename.
    let (_, os) = core
        .with_session(&cookie, &skey, "listOsTypes&description=Ubuntu%2022.04")
        .await;
    let ubuntu = &os["listostypesresponse"]["ostype"][0];
    assert_eq!(ubuntu["description"], "Ubuntu 22.04 LTS", "{os}");
    let os_id = ubuntu["id"].as_str().unwrap().to_owned();
    core.ok(&[
        "addImageStore",
        "name=s",
        "url=nfs://192.0.2.10/export",
        "provider=NFS",
    ])
    .await;
    let t = core
        .ok(&[
            "registerTemplate",
            "name=u22",
            "format=QCOW2",
            "hypervisor=KVM",
            "url=http://192.0.2.20/u22.qcow2",
            &format!("ostypeid={os_id}"),
            "zoneids=-1",
            "templatetype=USER",
            "arch=x86_64",
        ])
        .await;
    assert_eq!(t["template"][0]["ostypename"], "Ubuntu 22.04 LTS", "{t}");
    let bad = core
        .cs(&[
            "registerTemplate",
            "name=u23",
            "format=QCOW2",
            "hypervisor=KVM",
            "url=http://192.0.2.20/u23.qcow2",
            "ostypeid=00000000-0000-4000-8400-00000000ffff",
        ])
        .await;
    assert_eq!(errorcode(&bad.json), Some(431), "{}", bad.json);
    // Not ready yet: `self` lists it, `executable` does not; isready=false is no filter.
    let own = core
        .ok(&["listTemplates", "templatefilter=self", "name=u22"])
        .await;
    assert_eq!(own["count"], 1, "{own}");
    let exe = core
        .ok(&["listTemplates", "templatefilter=executable", "name=u22"])
        .await;
    assert!(exe.get("template").is_none(), "{exe}");
    let any = core
        .ok(&[
            "listTemplates",
            "templatefilter=executable",
            "name=u22",
            "isready=false",
        ])
        .await;
    assert_eq!(any["count"], 1, "{any}");
}

/// `listApis` lists every field the answers carry (what CloudMonkey's `filter=` completes), and
/// every parameter with its type and description.
async fn api_shapes(backend: Backend) {
    let core = Core::start(backend).await;
    core.ok(&[
        "addImageStore",
        "name=s",
        "url=nfs://192.0.2.10/export",
        "provider=NFS",
    ])
    .await;
    core.ok(&[
        "registerTemplate",
        "name=t",
        "format=QCOW2",
        "hypervisor=KVM",
        "url=http://192.0.2.20/t.qcow2",
    ])
    .await;
    core.ok(&["addConsoleTarget", "name=vm", "host=192.0.2.30", "port=5900"])
        .await;
    core.ok(&["createDomain", "name=D"]).await;
    // An async job, for listAsyncJobs.
    let d = core.ok(&["createDomain", "name=E"]).await["domain"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    core.ok(&["deleteDomain", &format!("id={d}")]).await;
    let apis = core.ok(&["listApis"]).await;
    let api = |name: &str| -> Value {
        apis["api"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("listApis lacks {name}"))
            .clone()
    };
    for a in apis["api"].as_array().unwrap() {
        for p in a["params"].as_array().unwrap() {
            for k in ["name", "type", "required", "description", "length"] {
                assert!(p.get(k).is_some(), "{} param lacks {k}: {p}", a["name"]);
            }
        }
    }
    for (args, key) in [
        (vec!["listZones"], "zone"),
        (vec!["listZonesMetrics"], "zone"),
        (vec!["listTemplates", "templatefilter=all"], "template"),
        (vec!["listAccounts"], "account"),
        (vec!["listUsers"], "user"),
        (vec!["listDomains", "listall=true"], "domain"),
        (vec!["listRoles"], "role"),
        (vec!["listRolePermissions"], "rolepermission"),
        (vec!["listImageStores"], "imagestore"),
        (vec!["listConfigurations"], "configuration"),
        (vec!["listOsTypes"], "ostype"),
        (vec!["listOsCategories"], "oscategory"),
        (vec!["listVirtualMachines"], "virtualmachine"),
        (vec!["listConsoleTargets"], "consoletarget"),
        (vec!["listApis"], "api"),
        (vec!["listAsyncJobs"], "asyncjobs"),
    ] {
        let v = core.ok(&args).await;
        let items = v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{args:?}: no {key}: {v}"));
        assert!(!items.is_empty(), "{args:?}");
        let declared: Vec<String> = api(args[0])["response"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect();
        for item in items {
            for field in item.as_object().unwrap().keys() {
                assert!(
                    declared.contains(field),
                    "{}: field {field} is not in listApis' response list",
                    args[0]
                );
            }
        }
    }
}
