// A small client on the types openapi-typescript generates from cqrsd's
// /openapi.json (see .ci/openapi). It compiles only if the document is typed
// for the domain: each `@ts-expect-error` below marks a call the types must
// refuse, and tsc fails if one of them is accepted.
import type { components as Bank, operations as BankOps, paths as BankPaths } from "./bank";
import type { components as Shop, operations as ShopOps } from "./shop";

type Reply<Op extends { responses: { 200: { content: { "application/json": unknown } } } }> =
  Op["responses"][200]["content"]["application/json"];

// A command's body is its JSON Schema.
const deposit: Bank["schemas"]["AccountDepositCommand"] = { amount: 10.5 };
// @ts-expect-error `amount` is required
const noAmount: Bank["schemas"]["AccountDepositCommand"] = {};
// @ts-expect-error additionalProperties = false
const extra: Bank["schemas"]["AccountOpenCommand"] = { owner: "Ada", nickname: "A" };

// A reply's events are the event types that command emits, with their data.
function deposited(reply: Reply<BankOps["depositAccount"]>): number {
  const event = reply.events[0];
  // @ts-expect-error `deposit` emits only MoneyDeposited
  const wrong: "MoneyWithdrawn" = event.type;
  return event.type === "MoneyDeposited" ? event.data.amount : 0;
}

// The aggregate's state has the initial state's fields and types.
function balance(reply: Reply<BankOps["getAccount"]>): number {
  const owner: string = reply.state.owner;
  return owner.length >= 0 ? reply.state.balance : 0;
}

// A list takes where.<indexed field> and an order over the indexed fields only.
type AccountsQuery = NonNullable<BankPaths["/views/accounts"]["get"]["parameters"]["query"]>;
const byOwner: AccountsQuery = { order: "-owner", "where.status": "open", limit: 10 };
// @ts-expect-error balance is not indexed
const byBalance: AccountsQuery = { order: "balance" };
// @ts-expect-error balance is not indexed
const whereBalance: AccountsQuery = { "where.balance": "1" };

// An aggregation's rows have its group fields and measures.
function flows(reply: Reply<BankOps["getDailyFlows"]>): number {
  return reply.rows.reduce((sum, row) => sum + row.count, 0);
}

// Search filters are the keyword and number fields.
const search: NonNullable<BankOps["searchAccountSearch"]["parameters"]["query"]> = {
  q: "ada",
  status: "open",
  balance: 0,
};

// The event stream takes an aggregate type from the domain.
const stream: NonNullable<BankOps["streamEvents"]["parameters"]["query"]> = { aggregate: "account" };
// @ts-expect-error no such aggregate type
const noStream: NonNullable<BankOps["streamEvents"]["parameters"]["query"]> = { aggregate: "nope" };

// The second domain: a schema with local references, and a command whose
// second event is conditional.
const place: Shop["schemas"]["OrderPlaceCommand"] = {
  customer: "c-1",
  lines: [{ sku: "apple", qty: 2 }],
};
// @ts-expect-error a line's qty is a number
const badLine: Shop["schemas"]["OrderPlaceCommand"] = { customer: "c-1", lines: [{ sku: "apple", qty: "2" }] };
function placed(reply: Reply<ShopOps["placeOrder"]>): string[] {
  return reply.events.map((event) => (event.type === "OrderPlaced" ? event.data.customer : event.type));
}
function gift(reply: Reply<ShopOps["addGiftOrder"]>): string {
  return reply.events[0].data.sku;
}

export const used = [deposit, noAmount, extra, deposited, balance, byOwner, byBalance, whereBalance, flows, search, stream, noStream, place, badLine, placed, gift];
