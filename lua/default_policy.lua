-- The policy of tenants that configure none: nothing is free, no rate limit,
-- the catalog's price as is (free offers cost 0), and a billing service that
-- does not answer in time means no sale. It defines no settle hook: an
-- x402/t402 payment settles as the tenant's payments.settle says.
local P = {}

function P.price(offer)
  if offer.model == "free" then return 0, offer.currency or "USD" end
  if offer.amount == nil or offer.currency == nil then return nil end
  return offer.amount, offer.currency
end

function P.on_billing_timeout()
  return "reject"
end

P.fixtures = {
  { hook = "price", offer = { amount = 15000, currency = "USD", model = "purchase" }, expect = { 15000, "USD" } },
  { hook = "price", offer = { model = "free", currency = "USD" }, expect = { 0, "USD" } },
  { hook = "price", offer = { model = "purchase" }, expect = {} },
  { hook = "on_billing_timeout", txn = { amount = 1 }, expect = { "reject" } },
}

return P
