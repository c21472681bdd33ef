package tenantpg

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// DriverName is the name the package registers its default driver under.
const DriverName = "tenantpg"

// Defaults for a zero Config field. A stock PostgreSQL allows 100
// connections of which 3 are reserved for superusers; a budget of 80 leaves
// room for migrations, psql and monitoring beside one application process.
const (
	DefaultMaxConnections      = 80
	DefaultMaxConnectionsPerDB = 3
	DefaultConnMaxLifetime     = 10 * time.Minute
	DefaultConnMaxIdleTime     = 5 * time.Minute
	DefaultAcquireTimeout      = 10 * time.Second
)

// Environment variables read by the registered driver the first time it is
// used, unless Configure was called first.
const (
	EnvMaxConnections      = "TENANTPG_MAX_CONNECTIONS"
	EnvMaxConnectionsPerDB = "TENANTPG_MAX_CONNECTIONS_PER_DB"
	EnvConnMaxLifetime     = "TENANTPG_CONN_MAX_LIFETIME"
	EnvConnMaxIdleTime     = "TENANTPG_CONN_MAX_IDLE_TIME"
	EnvAcquireTimeout      = "TENANTPG_ACQUIRE_TIMEOUT"
	EnvLeakThreshold       = "TENANTPG_LEAK_THRESHOLD"
	// The fleet budget (Config.FleetMaxConnections and the fields after it).
	EnvFleetMaxConnections = "TENANTPG_FLEET_MAX_CONNECTIONS"
	EnvFleetName           = "TENANTPG_FLEET_NAME"
	EnvFleetDatabase       = "TENANTPG_FLEET_DATABASE"
)

// Config holds a driver's settings. A zero field takes its default.
type Config struct {
	// MaxConnections is the budget of each server (host and port as the
	// DSNs resolve them): the most physical connections the driver holds
	// to that server at once, across its databases, counting connections
	// being dialed and being closed. Default 80.
	MaxConnections int
	// ServerMaxConnections gives servers a budget of their own, by host:port
	// as their DSNs name them (port 5432 when a DSN names none), for
	// workspaces spread over servers with different max_connections. A
	// server not listed gets MaxConnections.
	ServerMaxConnections map[string]int
	// ServerAliases names one server reached under several names, so that
	// they share one budget: each key (host:port, as a DSN names it; a Unix
	// socket's directory counts as its host) is counted as the server its
	// value names. For example {"localhost:5432": "127.0.0.1:5432"}. The
	// driver resolves no names itself: DNS answers change (failover, load
	// balancers) and a lookup would put I/O into sql.Open, while which
	// names are one server is something the application knows. Aliases
	// cannot change once a pool is open.
	ServerAliases map[string]string
	// MaxConnectionsPerDB caps one database's connections, so that a busy
	// workspace cannot take the whole budget. A DSN may override it with
	// pool_max_conns. Default 3, or the budget if that is smaller.
	MaxConnectionsPerDB int
	// ConnMaxLifetime closes a connection this old when it is next idle.
	// Default 10m.
	ConnMaxLifetime time.Duration
	// ConnMaxIdleTime closes a connection idle for this long. Default 5m.
	ConnMaxIdleTime time.Duration
	// AcquireTimeout bounds how long Connect waits for a token and dials.
	// database/sql's background opener calls Connect with a context that
	// never ends, so the driver needs a bound of its own. Default 10s.
	AcquireTimeout time.Duration
	// LeakThreshold, when set, reports a connection checked out for longer
	// than this (a *sql.Rows, *sql.Conn or *sql.Tx that is never closed, a
	// PoolConn never released) once, at Warn on Logger, with its workspace,
	// how long it has been held and the stack of the code that checked it
	// out, and counts it in Stats.SuspectedLeaks and the
	// tenantpg.budget.suspected_leaks metric. It reports; it closes
	// nothing. Stacks are captured at each checkout only while it is set,
	// which costs about a microsecond and a 256-byte allocation per
	// checkout (BENCHMARKS.md); set it well above the longest legitimate
	// transaction, for example 2m.
	// Default 0: off.
	LeakThreshold time.Duration

	// FleetMaxConnections, when set, is a budget shared by every process
	// (every replica of a service) that uses the same server, role and
	// FleetName: the sum of their sessions on the server, one coordination
	// session per process included, stays within it. Set the role's
	// CONNECTION LIMIT to the same figure, so that the server enforces it
	// too. Each process leases its share as session-level advisory locks
	// on its coordination session, to FleetDatabase on the same server, and
	// gives idle backends back when another process needs them; a process
	// that dies frees its share the moment its session ends. MaxConnections
	// still bounds one process's share (the coordination session counts in
	// it). At least 3. Default 0: no fleet, each process has its own
	// budget. See the README's fleet section.
	FleetMaxConnections int
	// FleetName separates fleets that share a server and role. Default
	// "tenantpg".
	FleetName string
	// FleetDatabase is the database the coordination session connects to.
	// Default "postgres".
	FleetDatabase string

	// Name is the db.client.connection.pool.name of the driver-wide metrics
	// (the budget, the histograms). Default "tenantpg".
	Name string
	// MeterProvider receives the driver's metrics. Default: the global
	// MeterProvider (otel.GetMeterProvider), which is a no-op until the
	// application installs one.
	MeterProvider metric.MeterProvider
	// ResolveWorkspace maps a workspace id to the DSN of its database, for
	// a *sql.DB or Pool opened with a {workspace} DSN (see WithWorkspace)
	// whose workspaces do not all follow its pattern. It is called the
	// first time such a *sql.DB serves a workspace, possibly by several
	// callers at once. What it returns is kept while the workspace holds
	// connections; a workspace that has gone quiet may be forgotten when
	// the *sql.DB has served more than a thousand, and is resolved again
	// when next used. An empty DSN means the pattern applies; an error fails the
	// caller. Default nil: the pattern applies to every workspace.
	ResolveWorkspace func(ctx context.Context, workspace string) (dsn string, err error)

	// TracerProvider receives a client span per statement and, for a
	// checkout that waited or dialed, a tenantpg.acquire span saying where
	// the time went. Default: the global TracerProvider, a no-op until the
	// application installs one.
	TracerProvider trace.TracerProvider
	// TraceQueryText records each statement's text as db.query.text on its
	// span, with its string, dollar-quoted and numeric literals replaced
	// by ?, as the OpenTelemetry semantic conventions ask for text that
	// may hold sensitive values. Default false: spans carry no text at
	// all, because a literal is where a password goes (ALTER ROLE ...
	// PASSWORD '...') and the sanitizer reads literals as a server with
	// standard_conforming_strings on does. Argument values ($1, ...) are
	// never recorded.
	TraceQueryText bool

	// DisableScramKeyCache makes every dial authenticate through pgx's own
	// SCRAM exchange, which derives the role's keys anew each time (PBKDF2:
	// about 0.7 ms of client CPU per dial at PostgreSQL's 4096 iterations).
	// By default the driver derives them once per password, salt and
	// iteration count, keeps them in memory only (never logged; at most
	// 4096 entries, least recently used out), and answers the server's
	// SCRAM-SHA-256 request itself with them, still checking the server's
	// signature on every dial. With channel_binding=prefer (the default)
	// over TLS it binds to the server's certificate (SCRAM-SHA-256-PLUS)
	// when the server offers it, as pgx does. Dials with require_auth,
	// channel_binding=require or a password that is not ASCII use pgx's
	// exchange, as do servers asking for any other method. Turning it off
	// drops the keys held. It exists to measure the difference side by
	// side, and as a way back should a server or proxy disagree with the
	// driver's exchange. Default false: the cache is on.
	DisableScramKeyCache bool

	// Logger receives one line per eviction batch (Debug), budget
	// exhaustion, server rejection, dial failure, a suspected leak (see
	// LeakThreshold) and a connection reclaimed from a dropped handle
	// (Warn), and a reported leak returned (Info). Nil: no logging. No
	// line contains a password or a DSN.
	Logger *slog.Logger
}

// normalize fills defaults and validates.
func (c Config) normalize() (Config, error) {
	perDBDefault := DefaultMaxConnectionsPerDB
	if c.MaxConnections > 0 && c.MaxConnections < perDBDefault {
		perDBDefault = c.MaxConnections // a default must not make a small budget invalid
	}
	ints := []struct {
		name string
		v    *int
		def  int
	}{
		{"MaxConnections", &c.MaxConnections, DefaultMaxConnections},
		{"MaxConnectionsPerDB", &c.MaxConnectionsPerDB, perDBDefault},
	}
	for _, f := range ints {
		if *f.v < 0 {
			return c, &ConfigError{Field: f.name, Reason: fmt.Sprintf("must be at least 1, got %d", *f.v)}
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	durations := []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"ConnMaxLifetime", &c.ConnMaxLifetime, DefaultConnMaxLifetime},
		{"ConnMaxIdleTime", &c.ConnMaxIdleTime, DefaultConnMaxIdleTime},
		{"AcquireTimeout", &c.AcquireTimeout, DefaultAcquireTimeout},
	}
	for _, f := range durations {
		if *f.v < 0 {
			return c, &ConfigError{Field: f.name, Reason: fmt.Sprintf("must not be negative, got %s", *f.v)}
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if c.FleetMaxConnections != 0 && c.FleetMaxConnections < 3 {
		return c, &ConfigError{Field: "FleetMaxConnections",
			Reason: fmt.Sprintf("must be at least 3 (a coordination session, a connection, and one kept free for a process joining), got %d", c.FleetMaxConnections)}
	}
	if c.FleetMaxConnections > 0 {
		if c.MaxConnections < 2 {
			return c, &ConfigError{Field: "MaxConnections",
				Reason: fmt.Sprintf("with a fleet budget it must be at least 2 (the coordination session counts in it), got %d", c.MaxConnections)}
		}
		for srv, n := range c.ServerMaxConnections {
			if n < 2 {
				return c, &ConfigError{Field: "ServerMaxConnections[" + srv + "]",
					Reason: fmt.Sprintf("with a fleet budget it must be at least 2 (the coordination session counts in it), got %d", n)}
			}
		}
		if c.FleetName == "" {
			c.FleetName = fleetDefaultName
		}
		if c.FleetDatabase == "" {
			c.FleetDatabase = fleetDefaultDatabase
		}
	}
	if c.LeakThreshold < 0 {
		return c, &ConfigError{Field: "LeakThreshold", Reason: fmt.Sprintf("must not be negative, got %s", c.LeakThreshold)}
	}
	if c.Name == "" {
		c.Name = DriverName
	}
	if len(c.ServerMaxConnections) > 0 {
		servers := make(map[string]int, len(c.ServerMaxConnections))
		for srv, n := range c.ServerMaxConnections {
			label, err := hostPortLabel(srv)
			if err != nil {
				return c, &ConfigError{Field: "ServerMaxConnections", Reason: fmt.Sprintf("key %q: %v", srv, err)}
			}
			if n < 1 {
				return c, &ConfigError{Field: "ServerMaxConnections[" + srv + "]", Reason: fmt.Sprintf("must be at least 1, got %d", n)}
			}
			servers[label] = n
		}
		c.ServerMaxConnections = servers // a copy: the caller's map may change later
	}
	if len(c.ServerAliases) > 0 {
		aliases := make(map[string]string, len(c.ServerAliases))
		for from, to := range c.ServerAliases {
			a, err := hostPortLabel(from)
			if err != nil {
				return c, &ConfigError{Field: "ServerAliases", Reason: fmt.Sprintf("key %q: %v", from, err)}
			}
			b, err := hostPortLabel(to)
			if err != nil {
				return c, &ConfigError{Field: "ServerAliases[" + from + "]", Reason: err.Error()}
			}
			aliases[a] = b
		}
		for from, to := range aliases {
			if _, chained := aliases[to]; chained && to != from {
				return c, &ConfigError{Field: "ServerAliases[" + from + "]",
					Reason: fmt.Sprintf("%q is itself an alias: name the server every alias stands for", to)}
			}
		}
		c.ServerAliases = aliases
	}
	if c.MaxConnectionsPerDB > c.MaxConnections {
		return c, &ConfigError{Field: "MaxConnectionsPerDB",
			Reason: fmt.Sprintf("%d exceeds MaxConnections %d", c.MaxConnectionsPerDB, c.MaxConnections)}
	}
	return c, nil
}

// hostPortLabel checks a host:port and returns it as the driver labels
// servers.
func hostPortLabel(s string) (string, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil || host == "" {
		return "", fmt.Errorf("want host:port, got %q", s)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return "", fmt.Errorf("%q: port must be 1-65535", s)
	}
	return net.JoinHostPort(host, port), nil
}

// ConfigFromEnv reads the TENANTPG_* environment variables into a Config.
// Unset variables leave their field zero, which means the default.
func ConfigFromEnv() (Config, error) {
	var c Config
	for _, f := range []struct {
		env string
		v   *int
	}{{EnvMaxConnections, &c.MaxConnections}, {EnvMaxConnectionsPerDB, &c.MaxConnectionsPerDB},
		{EnvFleetMaxConnections, &c.FleetMaxConnections}} {
		if s := os.Getenv(f.env); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 {
				return c, &ConfigError{Field: f.env, Reason: fmt.Sprintf("want a whole number of at least 1, got %q", s)}
			}
			*f.v = n
		}
	}
	for _, f := range []struct {
		env string
		v   *time.Duration
	}{{EnvConnMaxLifetime, &c.ConnMaxLifetime}, {EnvConnMaxIdleTime, &c.ConnMaxIdleTime}, {EnvAcquireTimeout, &c.AcquireTimeout},
		{EnvLeakThreshold, &c.LeakThreshold}} {
		if s := os.Getenv(f.env); s != "" {
			d, err := time.ParseDuration(s)
			if err != nil || d <= 0 {
				return c, &ConfigError{Field: f.env, Reason: fmt.Sprintf("want a positive Go duration such as 30s or 5m, got %q", s)}
			}
			*f.v = d
		}
	}
	c.FleetName = os.Getenv(EnvFleetName)
	c.FleetDatabase = os.Getenv(EnvFleetDatabase)
	return c, nil
}
