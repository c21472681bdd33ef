package tenantpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
	"go.opentelemetry.io/otel/metric"
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

// defaultHandoffGrace is how long a connection just returned to database/sql
// is protected from eviction. database/sql hands a returned connection to a
// caller waiting on the same *sql.DB (SetMaxOpenConns) after IsValid and
// before ResetSession; evicting it in that instant makes database/sql retry,
// and under load every retry met the same fate and callers saw
// "driver: bad connection".
// 1ms sufficed in a quiet test; with three test servers and -race sharing
// two cores, 5ms still let three hand-offs in a row be evicted once.
const defaultHandoffGrace = 20 * time.Millisecond

// defaultHandoffAfter bounds how long a waiter waits for an idle connection
// to evict before it takes the next connection any database checks in. Below
// it, hot databases keep reusing their connections, which under saturation
// measured fewer dials and more throughput than handing every returned
// connection to the oldest waiter; above it, a cold workspace is not starved
// by hot ones that reuse their connections faster than the grace period.
const defaultHandoffAfter = 100 * time.Millisecond

// defaultLivenessAfter is how long a connection must have been idle before
// its checkout peeks at the socket for a server that closed it (a
// terminated backend, a restart). The peek is a non-blocking system call
// (about a microsecond); connections reused sooner skip it, and pgx's own
// ping covers those idle for more than a second.
const defaultLivenessAfter = 50 * time.Millisecond

// Environment variables read by the registered driver the first time it is
// used, unless Configure was called first.
const (
	EnvMaxConnections      = "TENANTPG_MAX_CONNECTIONS"
	EnvMaxConnectionsPerDB = "TENANTPG_MAX_CONNECTIONS_PER_DB"
	EnvConnMaxLifetime     = "TENANTPG_CONN_MAX_LIFETIME"
	EnvConnMaxIdleTime     = "TENANTPG_CONN_MAX_IDLE_TIME"
	EnvAcquireTimeout      = "TENANTPG_ACQUIRE_TIMEOUT"
)

// Config holds a driver's settings. A zero field takes its default.
type Config struct {
	// MaxConnections is the budget: the most physical connections the
	// driver holds to the server at once, across all databases, counting
	// connections being dialed and being closed. Default 80.
	MaxConnections int
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

	// Name is the db.client.connection.pool.name of the driver-wide metrics
	// (the budget, the histograms). Default "tenantpg".
	Name string
	// MeterProvider receives the driver's metrics. Default: the global
	// MeterProvider (otel.GetMeterProvider), which is a no-op until the
	// application installs one.
	MeterProvider metric.MeterProvider
	// Logger receives one line per eviction batch (Debug), budget
	// exhaustion, server rejection and dial failure (Warn). Nil: no
	// logging. No line contains a password or a DSN.
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
	if c.Name == "" {
		c.Name = DriverName
	}
	if c.MaxConnectionsPerDB > c.MaxConnections {
		return c, &ConfigError{Field: "MaxConnectionsPerDB",
			Reason: fmt.Sprintf("%d exceeds MaxConnections %d", c.MaxConnectionsPerDB, c.MaxConnections)}
	}
	return c, nil
}

// ConfigFromEnv reads the TENANTPG_* environment variables into a Config.
// Unset variables leave their field zero, which means the default.
func ConfigFromEnv() (Config, error) {
	var c Config
	for _, f := range []struct {
		env string
		v   *int
	}{{EnvMaxConnections, &c.MaxConnections}, {EnvMaxConnectionsPerDB, &c.MaxConnectionsPerDB}} {
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
	}{{EnvConnMaxLifetime, &c.ConnMaxLifetime}, {EnvConnMaxIdleTime, &c.ConnMaxIdleTime}, {EnvAcquireTimeout, &c.AcquireTimeout}} {
		if s := os.Getenv(f.env); s != "" {
			d, err := time.ParseDuration(s)
			if err != nil || d <= 0 {
				return c, &ConfigError{Field: f.env, Reason: fmt.Sprintf("want a positive Go duration such as 30s or 5m, got %q", s)}
			}
			*f.v = d
		}
	}
	return c, nil
}

// Driver is a database/sql driver whose connections, across every database
// opened through it, share one budget. The package registers one under
// DriverName; NewDriver makes others, each with a budget of its own.
type Driver struct {
	b *budget

	initMu        sync.Mutex // guards the fields below
	envPending    bool       // the registered driver reads the environment on first use
	metricsSet    bool
	meterProvider metric.MeterProvider
	name          string
}

var (
	_ driver.Driver        = (*Driver)(nil)
	_ driver.DriverContext = (*Driver)(nil)
)

var defaultDriver = newDefaultDriver()

func newDefaultDriver() *Driver {
	cfg, _ := Config{}.normalize()
	d := &Driver{b: newBudget(cfg), envPending: true}
	// The global MeterProvider delegates to whatever provider the
	// application installs later, so instruments made now report then.
	_ = d.setupMetrics(nil, cfg.Name)
	return d
}

func init() {
	sql.Register(DriverName, defaultDriver)
}

// Default returns the driver registered as "tenantpg".
func Default() *Driver { return defaultDriver }

// NewDriver returns a driver with a budget of its own. Register it with
// sql.Register under a name of your choice, or use its OpenDB method.
func NewDriver(cfg Config) (*Driver, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	d := &Driver{b: newBudget(cfg)}
	if err := d.setupMetrics(cfg.MeterProvider, cfg.Name); err != nil {
		return nil, err
	}
	return d, nil
}

// Configure sets the registered driver's settings from code, in place of the
// environment. See (*Driver).Configure.
func Configure(cfg Config) error { return defaultDriver.Configure(cfg) }

// Configure changes the driver's settings. It may be called while
// connections are open: lowering the budget or the per-database cap closes
// idle connections down to the new limits at once and busy ones as they are
// returned, never one in use; raising it lets waiting callers proceed.
// Settings already applied to a *sql.DB by OpenDB are not changed.
func (d *Driver) Configure(cfg Config) error {
	cfg, err := cfg.normalize()
	if err != nil {
		return err
	}
	d.initMu.Lock()
	defer d.initMu.Unlock()
	if err := d.b.reconfigure(cfg); err != nil {
		return err
	}
	d.envPending = false
	return d.setupMetrics(cfg.MeterProvider, cfg.Name)
}

// ready applies the environment to the registered driver on first use.
func (d *Driver) ready() error {
	d.initMu.Lock()
	defer d.initMu.Unlock()
	if !d.envPending {
		return nil
	}
	cfg, err := ConfigFromEnv()
	if err == nil {
		cfg, err = cfg.normalize()
	}
	if err == nil {
		err = d.b.reconfigure(cfg)
	}
	if err != nil {
		return err
	}
	d.envPending = false
	return nil
}

// Open opens one connection for dsn. database/sql uses OpenConnector
// instead; Open serves callers that use the driver directly.
func (d *Driver) Open(dsn string) (driver.Conn, error) {
	c, err := d.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	// The connection keeps its database's state alive on its own.
	defer c.(*connector).Close()
	return c.Connect(context.Background())
}

// OpenConnector parses dsn and returns a connector for its database. Every
// connector for the same server, user and database shares one state, cap and
// reservation; the most recent connector's workspace label, pool_max_conns
// and pool_reserved_conns apply.
func (d *Driver) OpenConnector(dsn string) (driver.Connector, error) {
	if err := d.ready(); err != nil {
		return nil, err
	}
	p, err := parseDSN(dsn)
	if err != nil {
		return nil, err
	}
	db, err := d.b.register(p)
	if err != nil {
		return nil, err
	}
	cfg := p.cfg
	cfg.DialFunc = trackedDial(cfg.DialFunc)
	return &connector{drv: d, db: db, inner: stdlib.GetConnector(*cfg)}, nil
}

// OpenDB opens dsn through the registered driver. See (*Driver).OpenDB.
func OpenDB(dsn string) (*sql.DB, error) { return defaultDriver.OpenDB(dsn) }

// OpenDB opens dsn through d and sets the *sql.DB's own limits to agree with
// the budget: at most the database's cap open and idle, and the driver's
// idle time. With those limits database/sql queues callers of a busy
// database itself instead of asking the driver for connections the cap
// would refuse, and its cleaner drops the entries of connections the driver
// closed from its free list.
//
// It leaves database/sql's lifetime unset: the driver enforces
// ConnMaxLifetime itself, and database/sql checking it too would read the
// clock and do time arithmetic on every query.
func (d *Driver) OpenDB(dsn string) (*sql.DB, error) {
	c, err := d.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	b := d.b
	b.mu.Lock()
	capacity := b.capOf(c.(*connector).db)
	idle := b.idleTimeout
	b.mu.Unlock()
	db := sql.OpenDB(c)
	db.SetMaxOpenConns(capacity)
	db.SetMaxIdleConns(capacity)
	db.SetConnMaxIdleTime(idle)
	return db, nil
}

// Close closes every idle connection, fails every waiting caller and makes
// later connection attempts fail. Connections in use are closed when
// database/sql returns them. Close waits until the server has closed the
// connections it closed.
func (d *Driver) Close() error {
	d.b.close()
	return nil
}

// register attaches a parsed DSN to its database's shared state.
func (b *budget) register(p *dsnParams) (*database, error) {
	b.mu.Lock()
	defer b.unlock()
	if b.closed {
		return nil, errDriverClosed
	}
	if p.maxConns > b.limit {
		return nil, &DSNError{Workspace: p.workspace,
			Reason: fmt.Sprintf("pool_max_conns %d exceeds the budget of %d connections", p.maxConns, b.limit)}
	}
	d := b.dbs[p.key]
	if d == nil {
		d = &database{key: p.key, name: p.cfg.Database}
		b.dbs[p.key] = d
	}
	if others := b.reserved - d.reserved; others+p.reserved > b.limit {
		b.forgetLocked(d)
		return nil, &DSNError{Workspace: p.workspace,
			Reason: fmt.Sprintf("pool_reserved_conns %d does not fit: the budget is %d and other databases reserve %d", p.reserved, b.limit, others)}
	}
	// Move this database's share of the shared pool to the new reservation.
	if d.open > d.reserved {
		b.sharedInUse -= d.open - d.reserved
	}
	if d.open > p.reserved {
		b.sharedInUse += d.open - p.reserved
	}
	b.reserved += p.reserved - d.reserved
	old := liveShared(d)
	d.reserved = p.reserved
	b.sharedLive += liveShared(d) - old
	d.capOverride = p.maxConns
	if d.workspace != p.workspace {
		d.workspace = p.workspace
		d.metricOpts = nil // rebuilt with the new label at the next collection
	}
	d.refs++
	// A new reservation is backed at once by closing idle shared
	// connections; busy ones are closed as they are returned.
	b.shrinkLocked()
	b.serveWaitersLocked()
	return d, nil
}

func (b *budget) unregister(d *database) {
	b.mu.Lock()
	d.refs--
	b.forgetLocked(d)
	b.unlock()
}

// dbKey identifies a database on a server as a user sees it: two DSNs with
// the same key share one state, cap and reservation.
type dbKey struct {
	host     string
	port     uint16
	user     string
	database string
}

// DSN parameters tenantpg reads and removes before pgx sees the DSN; pgx
// would send unknown ones to the server as run-time parameters, and the
// server would refuse the connection.
const (
	paramWorkspace = "workspace"
	paramMaxConns  = "pool_max_conns"
	paramReserved  = "pool_reserved_conns"
)

const maxWorkspaceLen = 200

type dsnParams struct {
	cfg       *pgx.ConnConfig
	key       dbKey
	workspace string
	maxConns  int // 0: the driver's per-database default
	reserved  int
}

// parseDSN parses a URL or keyword/value DSN. Errors name the workspace when
// it can be read, and never contain the DSN or its password.
func parseDSN(dsn string) (*dsnParams, error) {
	label, secrets := dsnHints(dsn)
	fail := func(reason string) error {
		return &DSNError{Workspace: label, Reason: scrub(reason, dsn, secrets)}
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fail(parseErrorReason(err))
	}
	p := &dsnParams{cfg: cfg, workspace: cfg.Database}
	if validWorkspace(cfg.Database) == "" {
		label = cfg.Database
	}
	rp := cfg.RuntimeParams
	if ws, ok := rp[paramWorkspace]; ok {
		delete(rp, paramWorkspace)
		if err := validWorkspace(ws); err != "" {
			return nil, fail(err)
		}
		p.workspace = ws
	}
	label = p.workspace
	for _, f := range []struct {
		name string
		v    *int
		min  int
	}{{paramMaxConns, &p.maxConns, 1}, {paramReserved, &p.reserved, 0}} {
		s, ok := rp[f.name]
		if !ok {
			continue
		}
		delete(rp, f.name)
		n, err := strconv.Atoi(s)
		if err != nil || n < f.min {
			return nil, fail(fmt.Sprintf("%s must be a whole number of at least %d, got %q", f.name, f.min, s))
		}
		*f.v = n
	}
	if p.maxConns > 0 && p.reserved > p.maxConns {
		return nil, fail(fmt.Sprintf("%s %d exceeds %s %d", paramReserved, p.reserved, paramMaxConns, p.maxConns))
	}
	for k := range rp {
		if strings.HasPrefix(k, "pool_") {
			return nil, fail(fmt.Sprintf("unsupported parameter %s: tenantpg reads %s, %s and %s; other pool settings belong in Config",
				k, paramWorkspace, paramMaxConns, paramReserved))
		}
	}
	p.key = dbKey{host: cfg.Host, port: cfg.Port, user: cfg.User, database: cfg.Database}
	return p, nil
}

func validWorkspace(ws string) string {
	switch {
	case ws == "":
		return "workspace must not be empty"
	case len(ws) > maxWorkspaceLen:
		return fmt.Sprintf("workspace is longer than %d bytes", maxWorkspaceLen)
	case !utf8.ValidString(ws):
		return "workspace is not valid UTF-8"
	case strings.IndexFunc(ws, unicode.IsControl) >= 0:
		return "workspace contains control characters"
	}
	return ""
}

// parseErrorReason describes a pgx parse error without the DSN. pgx's
// ParseConfigError prints the DSN with the password redacted as best it can,
// and may wrap net/url's error, which quotes the raw URL, password and all.
func parseErrorReason(err error) string {
	var pce *pgconn.ParseConfigError
	if !errors.As(err, &pce) {
		return err.Error()
	}
	bare := *pce
	bare.ConnString = ""
	s := strings.TrimPrefix(bare.Error(), "cannot parse ``: ")
	if inner := bare.Unwrap(); inner != nil {
		var ue *url.Error
		if errors.As(inner, &ue) {
			s = strings.Replace(s, inner.Error(), ue.Err.Error(), 1)
		}
	}
	// What pgx quotes is a piece of the DSN, and in a malformed DSN any
	// piece may be a password. A piece may hold quotes itself, so all from
	// the first quote to the last goes.
	return quotedFragment.ReplaceAllString(s, `"…"`)
}

var quotedFragment = regexp.MustCompile(`(?s)".*"`)

var kvParam = regexp.MustCompile(`([A-Za-z_]+)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(\S*))`)

// dsnHints reads, best effort, the workspace label and any password from a
// DSN that may not parse, so that errors can name the first and never
// contain the second.
func dsnHints(dsn string) (label string, secrets []string) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		if u, err := url.Parse(dsn); err == nil {
			if pw, ok := u.User.Password(); ok {
				secrets = append(secrets, pw)
			}
			q := u.Query()
			secrets = append(secrets, q.Get("password"), q.Get("sslpassword"))
			label = q.Get(paramWorkspace)
			if label == "" {
				label = strings.TrimPrefix(u.Path, "/")
			}
		} else if at := strings.LastIndex(dsn, "@"); at > 0 {
			// Unparseable URL: everything between the scheme and the last
			// '@' may hold the password.
			userinfo := dsn[strings.Index(dsn, "://")+3 : at]
			if i := strings.Index(userinfo, ":"); i >= 0 {
				secrets = append(secrets, userinfo[i+1:])
			}
		}
	} else {
		var db string
		for _, m := range kvParam.FindAllStringSubmatch(dsn, -1) {
			v := m[2] + m[3]
			switch m[1] {
			case "password", "sslpassword":
				secrets = append(secrets, v, m[0])
			case paramWorkspace:
				label = v
			case "dbname":
				db = v
			}
		}
		if label == "" {
			label = db
		}
	}
	if validWorkspace(label) != "" {
		label = ""
	}
	return label, secrets
}

// scrub removes the DSN and any password from an error text.
func scrub(s, dsn string, secrets []string) string {
	if dsn != "" {
		s = strings.ReplaceAll(s, dsn, "[dsn]")
	}
	for _, sec := range secrets {
		if len(sec) >= 3 {
			s = strings.ReplaceAll(s, sec, "[redacted]")
			if esc := url.QueryEscape(sec); esc != sec {
				s = strings.ReplaceAll(s, esc, "[redacted]")
			}
			if esc := url.PathEscape(sec); esc != sec {
				s = strings.ReplaceAll(s, esc, "[redacted]")
			}
		}
	}
	return s
}
