package tenantpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/stdlib"
	"go.opentelemetry.io/otel/metric"
)

// Driver is a database/sql driver whose backends, across every database
// opened through it, share one budget. The package registers one under
// DriverName; NewDriver makes others, each with a budget of its own.
type Driver struct {
	b *budget

	initMu        sync.Mutex // guards the fields below
	envPending    bool       // the registered driver reads the environment on first use
	metricsSet    bool
	meterProvider metric.MeterProvider
	name          string

	// resolve is Config.ResolveWorkspace, read on a router's first
	// checkout of each workspace.
	resolve atomic.Pointer[func(context.Context, string) (string, error)]

	// scram holds the SCRAM keys of its pools' roles (scram.go).
	scram *scramCache
}

var (
	_ driver.Driver        = (*Driver)(nil)
	_ driver.DriverContext = (*Driver)(nil)
)

var defaultDriver = newDefaultDriver()

func newDefaultDriver() *Driver {
	cfg, _ := Config{}.normalize()
	d := &Driver{b: newBudget(cfg, realClock{}, pgxIO{}), envPending: true, scram: newScramCache()}
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
	d := &Driver{b: newBudget(cfg, realClock{}, pgxIO{}), scram: newScramCache()}
	d.setResolver(cfg.ResolveWorkspace)
	d.scram.setOff(cfg.DisableScramKeyCache)
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
// idle backends down to the new limits at once and busy ones as they are
// checked in, never one in use; raising it lets waiting callers proceed.
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
	d.setResolver(cfg.ResolveWorkspace)
	d.scram.setOff(cfg.DisableScramKeyCache)
	d.b.tracing.Store(newTracing(cfg.TracerProvider, cfg.TraceQueryText))
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

// Open returns a handle for dsn. database/sql uses OpenConnector instead;
// Open serves callers that use the driver directly.
func (d *Driver) Open(dsn string) (driver.Conn, error) {
	c, err := d.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	cn, ok := c.(*connector)
	if !ok {
		return nil, &DSNError{Reason: "a " + WorkspacePlaceholder + " DSN serves many databases: open it with sql.Open or OpenDB, not Driver.Open"}
	}
	// The handle is the pool's only user: it keeps the pool alive on its
	// own, and its Close ends the pool (no *sql.DB will close it).
	defer d.b.unregister(cn.db)
	return newHandle(d.b, cn, nil, nil)
}

// OpenConnector parses dsn and returns a connector: a pool of its own,
// whose backends are dialed with every setting of dsn and serve only this
// connector, on the budget of dsn's server. pool_max_conns and
// pool_reserved_conns apply to this pool.
func (d *Driver) OpenConnector(dsn string) (driver.Connector, error) {
	if err := d.ready(); err != nil {
		return nil, err
	}
	p, err := parseDSN(dsn)
	if err != nil {
		return nil, err
	}
	if p.routed {
		return &router{drv: d, tmpl: p}, nil
	}
	return d.newConnector(p)
}

// newConnector registers p's database and returns its connector.
func (d *Driver) newConnector(p *dsnParams) (*connector, error) {
	db, err := d.b.register(p)
	if err != nil {
		return nil, err
	}
	cfg := p.cfg
	cfg.DialFunc = trackedDial(cfg.DialFunc)
	cfg.AfterNetConnect = d.scram.hook(cfg.AfterNetConnect)
	return &connector{drv: d, db: db, workspace: p.workspace, inner: stdlib.GetConnector(*cfg), password: cfg.Password}, nil
}

// resolver returns Config.ResolveWorkspace as last configured.
func (d *Driver) resolver() func(context.Context, string) (string, error) {
	if f := d.resolve.Load(); f != nil {
		return *f
	}
	return nil
}

func (d *Driver) setResolver(f func(context.Context, string) (string, error)) {
	if f == nil {
		d.resolve.Store(nil)
		return
	}
	d.resolve.Store(&f)
}

// OpenDB opens dsn through the registered driver. See (*Driver).OpenDB.
func OpenDB(dsn string) (*sql.DB, error) { return defaultDriver.OpenDB(dsn) }

// OpenDB opens dsn through d. database/sql's connections are handles that
// hold a backend only while in use, so it leaves database/sql's open limit
// unset: every caller gets a handle and queues in the driver, in arrival
// order, where the driver sees the whole queue when it decides whether the
// database needs another backend. With the limit at the cap, database/sql
// queues the callers beyond it itself and hands a returned handle to a
// waiter chosen at random. It keeps as many idle handles
// as the budget has tokens, so that a busy database does not allocate a
// handle per query.
func (d *Driver) OpenDB(dsn string) (*sql.DB, error) {
	c, err := d.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	return d.sqlDB(c), nil
}

// openParams is OpenDB of a parsed DSN: the registry's Pattern with an id
// in its database name, which never goes back through a DSN's text.
func (d *Driver) openParams(p *dsnParams) (*sql.DB, error) {
	if err := d.ready(); err != nil {
		return nil, err
	}
	c, err := d.newConnector(p)
	if err != nil {
		return nil, err
	}
	return d.sqlDB(c), nil
}

func (d *Driver) sqlDB(c driver.Connector) *sql.DB {
	db := sql.OpenDB(c)
	db.SetMaxIdleConns(d.b.settingsLimit())
	return db
}

// Close closes every idle backend, fails every waiting caller and makes
// later checkouts fail. Backends in use are closed when they are checked
// in. Close waits until the server has closed the backends it closed.
func (d *Driver) Close() error {
	d.b.close()
	return nil
}
