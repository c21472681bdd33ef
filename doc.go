// Package tenantpg is a database/sql driver for applications that give every
// tenant (workspace) its own PostgreSQL database. Every physical connection,
// to every database opened through it, draws one token from one process-wide
// budget, so the server never sees more connections than the budget however
// many workspaces are open.
//
// # Why
//
// Opening a *sql.DB per workspace gives each workspace its own pool. With a
// few dozen busy workspaces the pools together exceed the server's
// max_connections and every request fails with "sorry, too many clients
// already" (SQLSTATE 53300). Nothing in database/sql or pgx caps connections
// across pools, and an external pooler caps them without handing idle
// connections of one database over to another that needs one now.
//
// # Use
//
// Import the package for its side effect and open each workspace as before:
//
//	import _ "github.com/tenantpg/tenantpg"
//
//	db, err := sql.Open("tenantpg", "postgres://app:secret@db:5432/ws_abc?workspace=abc")
//
// or use [OpenDB], which also sets the *sql.DB's own limits to agree with
// the budget (recommended). Any DSN that pgx accepts works, in URL or
// keyword/value form. tenantpg reads and removes three parameters of its
// own: workspace (a label for stats, errors and metrics; default the
// database name), pool_max_conns (this database's cap) and
// pool_reserved_conns (connections set aside for this database alone, for
// an application's system database).
//
// # The model
//
// A token is taken before a dial starts and given back only after the server
// has closed the backend's socket, so connections being dialed and being
// closed count too. Each database is also capped (3 by default) so that one
// busy workspace cannot take the whole budget.
//
// When a connection is needed and the budget is full, the idle connection
// of the least recently used database is closed and its token handed to the
// caller. Recency is segmented: databases that have reused a connection are
// protected (up to 80% of the budget) and evicted only after those that have
// not, so a long tail of workspaces seen once does not push out the hot
// ones. The recency order is updated in O(1) on every checkout and check-in,
// and choosing a victim does not depend on the number of databases. Only
// connections database/sql has handed back are ever closed this way: a
// connection in use, in a transaction, pinned by db.Conn or under Raw is
// never touched. A connection just handed back is protected for a few
// milliseconds, because database/sql may be passing it straight to another
// caller of the same *sql.DB.
//
// When nothing idle can be closed, callers wait in arrival order until a
// token frees, their context ends or [Config.AcquireTimeout] passes; they
// then get an error that matches [ErrBudgetExhausted] (see [BudgetError]).
// A caller that has waited more than 100ms takes the next connection any
// database returns, so that a cold workspace is not starved by hot ones.
//
// Idle connections older than [Config.ConnMaxIdleTime] and connections older
// than [Config.ConnMaxLifetime] are closed by the driver itself. A database
// with no connections costs no goroutine and its state is dropped once no
// *sql.DB uses it.
//
// # Configuration
//
// The registered driver reads TENANTPG_MAX_CONNECTIONS,
// TENANTPG_MAX_CONNECTIONS_PER_DB, TENANTPG_CONN_MAX_LIFETIME,
// TENANTPG_CONN_MAX_IDLE_TIME and TENANTPG_ACQUIRE_TIMEOUT the first time it
// is used, unless [Configure] set its settings from code first. [NewDriver]
// makes a driver with a budget of its own. Settings may change at run time:
// lowering the budget closes idle connections at once and busy ones as they
// are returned.
//
// # Metrics, stats and logs
//
// Each driver reports OpenTelemetry metrics (the db.client.connection.*
// semantic conventions per workspace, tenantpg.budget.* for the budget)
// through [Config.MeterProvider] or the global provider. Per-workspace
// series exist only while a workspace holds connections or has callers
// waiting. [Driver.Stats] returns a JSON-ready snapshot and [StatsHandler]
// serves it; [Config.Logger] receives evictions, exhaustion and dial
// failures.
//
// # Errors
//
// [BudgetError] (errors.Is [ErrBudgetExhausted]): no connection within the
// wait; answer 503 with Retry-After. [ConnectError]: the dial failed; it
// wraps pgx's error, so the server's SQLSTATE is reachable with errors.As.
// [DSNError] and [ConfigError]: bad input. No error, stats field or log line
// contains a password or a DSN.
//
// # Caveats
//
// A pinned connection (db.Conn, a transaction, an open *sql.Rows) holds its
// token until it is released; a leaked one holds it forever. (*sql.DB).Stats
// keeps counting a connection the driver closed until database/sql next
// touches it; [Driver.Stats] counts what the server sees. A new backend costs
// the server a fork and authentication, so a workload that touches more
// databases at once than the budget can hold is bound by connection setup,
// not by the driver.
package tenantpg
