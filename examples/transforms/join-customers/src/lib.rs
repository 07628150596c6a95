//! A stream-table join: enriches each order (a JSON value keyed by customer id) with
//! its customer, read from table store `customers`, which the runtime keeps from a
//! compacted topic of customers keyed by id (partitioned like the orders). Emits
//! `{"order": ORDER, "customer": CUSTOMER}`, with `null` for a customer not (yet) in
//! the table (a left join). A customer updated in the topic is seen by the orders
//! processed after the update arrived.
//!
//! Deploy: `runnel transform deploy --name enrich-orders --input orders --output
//! orders-enriched --wasm join_customers.wasm --table customers=customers`.

use runnel_sdk::stateful::{Init, StatefulTransform, Store};
use runnel_sdk::{Output, Record};
use serde_json::Value;

struct JoinCustomers {
    customers: Store<String, Value>,
}

impl StatefulTransform for JoinCustomers {
    fn init(init: &Init) -> Result<Self, String> {
        Ok(JoinCustomers {
            customers: init.store("customers")?,
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let id = record
            .key_str()
            .ok_or("the order has no UTF-8 key (its customer id)")?
            .to_string();
        let order: Value = serde_json::from_slice(record.value().unwrap_or(b"null"))
            .map_err(|err| format!("the order is not JSON: {err}"))?;
        let customer = self.customers.get(&id)?.unwrap_or(Value::Null);
        let joined = serde_json::json!({ "order": order, "customer": customer });
        out.emit(record.key(), Some(joined.to_string().as_bytes()));
        Ok(())
    }
}

runnel_sdk::export_stateful_transform!(JoinCustomers);
