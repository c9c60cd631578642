//! The order mix, fixed before anything is sent, so the pipeline and the synchronous baseline
//! process exactly the same orders: who orders what, how many, with which coupon, and how
//! much each user is charged beforehand.

use super::args::OrderSettings;

/// Prices are 1,000..=10,000 won, so a user's orders fit under the 10,000,000 balance cap.
const PRICE_STEP: i64 = 1_000;
/// Every coupon takes this many won off (less than the cheapest product).
pub const COUPON_DISCOUNT: i64 = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedOrder {
    /// Index into the users (0-based).
    pub user: usize,
    /// Index into the products (0-based).
    pub product: usize,
    pub quantity: i32,
    /// Index of the coupon this order uses: a user's k-th coupon order uses coupon k, so no
    /// user ever needs one coupon twice.
    pub coupon: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductSpec {
    pub price: i64,
    pub stock: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub orders: Vec<PlannedOrder>,
    pub users: usize,
    pub products: Vec<ProductSpec>,
    /// For each coupon: the users (indices) who get it issued.
    pub coupons: Vec<Vec<usize>>,
    /// For each user: the won to charge before the run (what all their orders cost).
    pub funding: Vec<i64>,
}

/// The balance cap of DESIGN.md §4.
pub const BALANCE_MAX: i64 = 10_000_000;

impl Plan {
    pub fn new(s: &OrderSettings) -> Self {
        let users = usize::try_from(s.users).unwrap_or(usize::MAX);
        let n_products = if s.hot_stock.is_some() {
            1
        } else {
            usize::try_from(s.products).unwrap_or(1).max(1)
        };
        let n = usize::try_from(s.orders).unwrap_or(0);
        let mut rng = SplitMix64(s.seed);
        let mut coupon_orders_of = vec![0usize; users];
        let mut coupons: Vec<Vec<usize>> = Vec::new();
        let mut orders = Vec::with_capacity(n);
        for i in 0..n {
            let user = i % users;
            let (product, quantity) = if s.hot_stock.is_some() {
                (0, 1)
            } else {
                (rng.below(n_products as u64) as usize, 1 + rng.below(2) as i32)
            };
            let coupon = uses_coupon(i as u64, s.coupon_share).then(|| {
                let k = coupon_orders_of[user];
                coupon_orders_of[user] += 1;
                if coupons.len() <= k {
                    coupons.push(Vec::new());
                }
                coupons[k].push(user);
                k
            });
            orders.push(PlannedOrder {
                user,
                product,
                quantity,
                coupon,
            });
        }
        let mut demand = vec![0i64; n_products];
        let mut funding = vec![0i64; users];
        let prices: Vec<i64> = (0..n_products).map(price).collect();
        for o in &orders {
            demand[o.product] += i64::from(o.quantity);
            funding[o.user] += cost(prices[o.product], o.quantity, o.coupon.is_some());
        }
        for f in &mut funding {
            *f = (*f).min(BALANCE_MAX);
        }
        let products = prices
            .iter()
            .zip(&demand)
            .map(|(&price, &d)| ProductSpec {
                price,
                // Plenty unless hot: twice the demand, so stock is never what limits the run.
                stock: s.hot_stock.unwrap_or(2 * d + 100),
            })
            .collect();
        Self {
            orders,
            users,
            products,
            coupons,
            funding,
        }
    }

    /// What order `o` costs after its discount.
    #[cfg(test)]
    pub fn cost(&self, o: &PlannedOrder) -> i64 {
        cost(self.products[o.product].price, o.quantity, o.coupon.is_some())
    }
}

fn price(product: usize) -> i64 {
    PRICE_STEP * (1 + (product % 10) as i64)
}

fn cost(price: i64, quantity: i32, coupon: bool) -> i64 {
    let total = price * i64::from(quantity);
    if coupon {
        total - COUPON_DISCOUNT.min(total)
    } else {
        total
    }
}

/// Spreads exactly `round(n * share)` coupon orders evenly over the first `n` orders.
fn uses_coupon(i: u64, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

/// The charges (each 1,000..=100,000, a multiple of 10) that add up to at least `amount`.
pub fn charges(amount: i64) -> Vec<i64> {
    let mut left = amount.max(0);
    // Round up to a multiple of 10.
    left = (left + 9) / 10 * 10;
    let mut out = Vec::new();
    while left > 0 {
        let step = left.clamp(1_000, 100_000);
        out.push(step);
        left -= step.min(left);
    }
    out
}

/// A small, seedable PRNG (SplitMix64): enough for an order mix, no dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::args::LoadModel;

    fn settings(orders: u64, users: u64, share: f64, hot: Option<i64>) -> OrderSettings {
        OrderSettings {
            orders,
            users,
            products: 4,
            model: LoadModel::Closed { concurrency: 1 },
            coupon_share: share,
            hot_stock: hot,
            baseline: None,
            baseline_concurrency: None,
            timeout: Duration::from_secs(1),
            poll_interval: Duration::from_millis(10),
            poll_concurrency: 1,
            observe: crate::args::Observe::Poll,
            wait_connections: 1,
            max_in_flight: 1,
            seed: 1,
        }
    }

    #[test]
    fn the_coupon_share_is_exact_and_no_user_needs_a_coupon_twice() {
        let plan = Plan::new(&settings(1_000, 7, 0.2, None));
        assert_eq!(plan.orders.iter().filter(|o| o.coupon.is_some()).count(), 200);
        for holders in &plan.coupons {
            let mut users = holders.clone();
            users.sort_unstable();
            users.dedup();
            assert_eq!(users.len(), holders.len(), "a user got one coupon twice");
        }
        let issued: usize = plan.coupons.iter().map(Vec::len).sum();
        assert_eq!(issued, 200);
        assert_eq!(
            Plan::new(&settings(10, 3, 1.0, None))
                .coupons
                .iter()
                .map(Vec::len)
                .sum::<usize>(),
            10
        );
        assert!(Plan::new(&settings(10, 3, 0.0, None)).coupons.is_empty());
    }

    #[test]
    fn funding_covers_every_order_and_stock_is_plenty_unless_hot() {
        let plan = Plan::new(&settings(500, 9, 0.3, None));
        for u in 0..plan.users {
            let cost: i64 = plan.orders.iter().filter(|o| o.user == u).map(|o| plan.cost(o)).sum();
            assert_eq!(plan.funding[u], cost);
            assert!(charges(plan.funding[u]).iter().sum::<i64>() >= cost);
        }
        for (p, spec) in plan.products.iter().enumerate() {
            let demand: i64 = plan
                .orders
                .iter()
                .filter(|o| o.product == p)
                .map(|o| i64::from(o.quantity))
                .sum();
            assert!(spec.stock > demand);
        }
        let hot = Plan::new(&settings(1_000, 9, 0.0, Some(100)));
        assert_eq!(
            hot.products,
            vec![ProductSpec {
                price: 1_000,
                stock: 100
            }]
        );
        assert!(hot.orders.iter().all(|o| o.product == 0 && o.quantity == 1));
    }

    #[test]
    fn the_same_seed_gives_the_same_mix() {
        assert_eq!(
            Plan::new(&settings(100, 5, 0.5, None)),
            Plan::new(&settings(100, 5, 0.5, None))
        );
    }

    #[test]
    fn charges_respect_the_api_limits() {
        assert_eq!(charges(0), Vec::<i64>::new());
        assert_eq!(charges(1), vec![1_000]);
        assert_eq!(charges(2_345), vec![2_350]);
        assert_eq!(charges(250_000), vec![100_000, 100_000, 50_000]);
        assert_eq!(charges(200_500), vec![100_000, 100_000, 1_000]);
        for c in charges(9_999_999) {
            assert!((1_000..=100_000).contains(&c) && c % 10 == 0);
        }
    }
}
