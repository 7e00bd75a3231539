//! A reference client of the catch-up API (docs/api.md): what a device does to hold its branch's products and
//! inventory, in as few lines as it takes. It starts from a snapshot (all pages, remembering the smallest
//! `as_of`), then applies the events after it from `GET /api/v1/changes`, page by page: an event at or below
//! the branch_seq already applied is skipped (idempotent by `branch_seq`), an event whose `seq` is not above
//! the row's is dropped (stale), and a 410 `resync_required` starts again from a snapshot. The same `apply`
//! takes the events MQTT delivers. Used by tests/catchup.rs; the device guide points at it.

use std::collections::BTreeMap;

use serde_json::Value;

/// A product as the device holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub name: String,
    pub price: Value,
    pub stock: i64,
    pub updated_by: Option<String>,
    /// The seq of the latest event (or snapshot row) applied; None: never published.
    pub seq: Option<i64>,
}

/// An inventory row as the device holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    pub product_id: i64,
    pub product_name: String,
    pub quantity: i64,
    pub updated_by: Option<String>,
    pub seq: Option<i64>,
}

pub struct ReferenceClient {
    http: String,
    token: String,
    /// Extra query parameters (the admin token's merchant_code and branch_code), "" for a device.
    scope: String,
    client: reqwest::Client,
    pub products: BTreeMap<i64, Product>,
    pub inventory: BTreeMap<i64, Inventory>,
    /// Deleted rows' last seq: a stale event for a deleted row must not bring it back.
    gone: BTreeMap<(&'static str, i64), i64>,
    /// The branch_seq applied up to (every event at or below it is in the state).
    pub applied: i64,
    /// Snapshots taken (the first one, and one per 410).
    pub snapshots: usize,
    pub pages: usize,
}

/// A failed call: the status and the body.
#[derive(Debug)]
pub struct CallError(pub u16, pub String);

impl ReferenceClient {
    /// `token`: the device's password; `scope`: "" for a device token, or
    /// `merchant_code=..&branch_code=..` with the admin token.
    pub fn new(http: &str, token: &str, scope: &str) -> ReferenceClient {
        ReferenceClient {
            http: http.to_string(),
            token: token.to_string(),
            scope: scope.to_string(),
            client: reqwest::Client::new(),
            products: BTreeMap::new(),
            inventory: BTreeMap::new(),
            gone: BTreeMap::new(),
            applied: 0,
            snapshots: 0,
            pages: 0,
        }
    }

    async fn get(&self, path_and_query: &str) -> Result<Value, CallError> {
        let sep = if self.scope.is_empty() { "" } else { "&" };
        let url = format!("{}{path_and_query}{sep}{}", self.http, self.scope);
        let resp = self
            .client
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| CallError(0, e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| CallError(status, e.to_string()))?;
        if status != 200 {
            return Err(CallError(status, text));
        }
        serde_json::from_str(&text).map_err(|e| CallError(status, format!("{e}: {text}")))
    }

    /// Replaces the state by a snapshot, page by page (`limit` rows each); `between_pages` runs after each
    /// page (a test lets writers go on meanwhile). The state then stands at the smallest `as_of` of the pages:
    /// events after it are applied on top, stale ones dropped by their seq.
    pub async fn snapshot(&mut self, limit: u32, mut between_pages: impl FnMut()) -> Result<(), CallError> {
        self.products.clear();
        self.inventory.clear();
        self.gone.clear();
        let mut cursor: Option<String> = None;
        let mut as_of = i64::MAX;
        loop {
            let q = match &cursor {
                Some(c) => format!("/api/v1/snapshot?limit={limit}&cursor={c}"),
                None => format!("/api/v1/snapshot?limit={limit}"),
            };
            let page = self.get(&q).await?;
            self.pages += 1;
            as_of = as_of.min(page["as_of"].as_i64().unwrap_or(0));
            for p in page["products"].as_array().into_iter().flatten() {
                self.products.insert(
                    p["product_id"].as_i64().unwrap_or(-1),
                    Product {
                        name: p["product_name"].as_str().unwrap_or("").to_string(),
                        price: p["price"].clone(),
                        stock: p["stock"].as_i64().unwrap_or(0),
                        updated_by: p["updated_by"].as_str().map(str::to_string),
                        seq: p["seq"].as_i64(),
                    },
                );
            }
            for i in page["inventory"].as_array().into_iter().flatten() {
                self.inventory.insert(
                    i["inventory_id"].as_i64().unwrap_or(-1),
                    Inventory {
                        product_id: i["product_id"].as_i64().unwrap_or(-1),
                        product_name: i["product_name"].as_str().unwrap_or("").to_string(),
                        quantity: i["quantity"].as_i64().unwrap_or(0),
                        updated_by: i["updated_by"].as_str().map(str::to_string),
                        seq: i["seq"].as_i64(),
                    },
                );
            }
            between_pages();
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        self.applied = if as_of == i64::MAX { 0 } else { as_of };
        self.snapshots += 1;
        Ok(())
    }

    /// Applies one event (from MQTT or from the changes API). False when it was skipped: already applied
    /// (branch_seq) or not after the one applied last (a gap: the caller fetches what is missing first).
    pub fn apply(&mut self, e: &Value) -> bool {
        let Some(branch_seq) = e["branch_seq"].as_i64() else {
            return false;
        };
        if branch_seq != self.applied + 1 {
            return false;
        }
        self.applied = branch_seq;
        let seq = e["seq"].as_i64().unwrap_or(0);
        let d = &e["data"];
        let text = |k: &str| d[k].as_str().map(str::to_string);
        let fresh =
            |held: Option<i64>, gone: Option<&i64>| held.is_none_or(|s| seq > s) && gone.is_none_or(|g| seq > *g);
        match e["event_type"].as_str().unwrap_or("") {
            "product_updated" | "stock_updated" => {
                let id = d["product_id"].as_i64().unwrap_or(-1);
                let held = self.products.get(&id).and_then(|p| p.seq);
                if !fresh(held, self.gone.get(&("products", id))) {
                    return true;
                }
                let p = self.products.entry(id).or_insert(Product {
                    name: String::new(),
                    price: Value::Null,
                    stock: 0,
                    updated_by: None,
                    seq: None,
                });
                p.name = text("product_name").unwrap_or_default();
                p.updated_by = text("updated_by");
                p.seq = Some(seq);
                if e["event_type"] == "product_updated" {
                    p.price = d["price"].clone();
                    p.stock = d["stock"].as_i64().unwrap_or(0);
                } else {
                    p.stock = d["new_stock"].as_i64().unwrap_or(0);
                }
            }
            "quantity_updated" => {
                let id = d["inventory_id"].as_i64().unwrap_or(-1);
                let held = self.inventory.get(&id).and_then(|i| i.seq);
                if !fresh(held, self.gone.get(&("inventory", id))) {
                    return true;
                }
                self.inventory.insert(
                    id,
                    Inventory {
                        product_id: d["product_id"].as_i64().unwrap_or(-1),
                        product_name: text("product_name").unwrap_or_default(),
                        quantity: d["new_quantity"].as_i64().unwrap_or(0),
                        updated_by: text("updated_by"),
                        seq: Some(seq),
                    },
                );
            }
            "product_deleted" => {
                let id = d["product_id"].as_i64().unwrap_or(-1);
                if fresh(self.products.get(&id).and_then(|p| p.seq), None) {
                    self.products.remove(&id);
                    self.gone.insert(("products", id), seq);
                }
            }
            "inventory_deleted" => {
                let id = d["inventory_id"].as_i64().unwrap_or(-1);
                if fresh(self.inventory.get(&id).and_then(|i| i.seq), None) {
                    self.inventory.remove(&id);
                    self.gone.insert(("inventory", id), seq);
                }
            }
            // Sales, and any type this client does not know: nothing to hold.
            _ => {}
        }
        true
    }

    /// Fetches and applies everything after what is applied, `limit` events a page, until up to date; on a
    /// 410 takes a snapshot (`snapshot_limit` rows a page) and goes on from there. Returns the events applied.
    pub async fn catch_up(&mut self, limit: u32, snapshot_limit: u32) -> Result<usize, CallError> {
        let mut applied = 0;
        loop {
            let page = match self
                .get(&format!("/api/v1/changes?after={}&limit={limit}", self.applied))
                .await
            {
                Ok(p) => p,
                Err(CallError(410, _)) => {
                    self.snapshot(snapshot_limit, || {}).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.pages += 1;
            for e in page["events"].as_array().into_iter().flatten() {
                if self.apply(e) {
                    applied += 1;
                }
            }
            if page["up_to_date"] == true {
                return Ok(applied);
            }
        }
    }
}
