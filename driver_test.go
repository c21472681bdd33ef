package tenantpg

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

func TestParseDSN(t *testing.T) {
	cases := []struct {
		name, dsn          string
		workspace          string
		maxConns, reserved int
		db, user           string
		port               uint16
	}{
		{"url", "postgres://app:pw@db.internal:6432/notifuse_ws_abc?sslmode=disable",
			"notifuse_ws_abc", 0, 0, "notifuse_ws_abc", "app", 6432},
		{"url with tenantpg parameters",
			"postgresql://app:pw@db:5432/notifuse_ws_abc?workspace=abc&pool_max_conns=5&pool_reserved_conns=2&application_name=x",
			"abc", 5, 2, "notifuse_ws_abc", "app", 5432},
		{"keyword/value", "host=db port=5433 user=app password='p w' dbname=ws_9 workspace=nine pool_max_conns=2",
			"nine", 2, 0, "ws_9", "app", 5433},
		{"keyword/value, quoted workspace", "host=db user=app dbname=ws_9 workspace='Acme Corp'",
			"Acme Corp", 0, 0, "ws_9", "app", 5432},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := parseDSN(c.dsn)
			require.NoError(t, err)
			require.Equal(t, c.workspace, p.workspace)
			require.Equal(t, c.maxConns, p.maxConns)
			require.Equal(t, c.reserved, p.reserved)
			require.Equal(t, c.port, p.server.port)
			require.Equal(t, c.user, p.cfg.User)
			require.Equal(t, c.db, p.cfg.Database)
			for _, k := range []string{paramWorkspace, paramMaxConns, paramReserved} {
				require.NotContains(t, p.cfg.RuntimeParams, k, "tenantpg parameters must not reach the server")
			}
		})
	}
	t.Run("same server, different spelling", func(t *testing.T) {
		a, err := parseDSN("postgres://app:x@db:5432/ws1?workspace=one")
		require.NoError(t, err)
		b, err := parseDSN("host=db port=5432 user=app password=y dbname=ws1 workspace=uno")
		require.NoError(t, err)
		require.Equal(t, a.server, b.server)
	})
}

const dsnPassword = "Zebra-Moonlight-7731"

func TestParseDSNErrors(t *testing.T) {
	cases := []struct {
		name, dsn, want, workspace string
	}{
		{"bad pool_max_conns", "postgres://app:" + dsnPassword + "@db/ws1?pool_max_conns=lots", "pool_max_conns must be a whole number", "ws1"},
		{"zero pool_max_conns", "postgres://app:" + dsnPassword + "@db/ws1?pool_max_conns=0&workspace=w", "pool_max_conns must be a whole number", "w"},
		{"negative reserve", "host=db user=app password=" + dsnPassword + " dbname=ws2 pool_reserved_conns=-1", "pool_reserved_conns must be", "ws2"},
		{"reserve above cap", "postgres://app:" + dsnPassword + "@db/ws1?pool_max_conns=2&pool_reserved_conns=3", "pool_reserved_conns 3 exceeds pool_max_conns 2", "ws1"},
		{"pgxpool setting", "postgres://app:" + dsnPassword + "@db/ws1?pool_min_conns=2", "unsupported parameter pool_min_conns", "ws1"},
		{"empty workspace", "postgres://app:" + dsnPassword + "@db/ws1?workspace=", "workspace must not be empty", "ws1"},
		{"control characters", "postgres://app:" + dsnPassword + "@db/ws1?workspace=a%0Ab", "control characters", "ws1"},
		{"bad port", "postgres://app:" + dsnPassword + "@db:notaport/ws1", "invalid", ""},
		{"bad url escape", "postgres://app:" + dsnPassword + "%zz@db/ws1", "", ""},
		{"unterminated quote", "host=db user=app password='" + dsnPassword + " dbname=ws3", "", "ws3"},
		{"bad sslmode", "host=db user=app password=" + dsnPassword + " dbname=ws4 sslmode=sometimes", "sslmode", "ws4"},
		{"bad connect_timeout", "postgres://app:" + dsnPassword + "@db/ws5?connect_timeout=soon", "connect_timeout", "ws5"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := parseDSN(c.dsn)
			require.Error(t, err)
			var de *DSNError
			require.ErrorAs(t, err, &de)
			msg := err.Error()
			require.NotContains(t, msg, dsnPassword)
			require.NotContains(t, msg, c.dsn)
			require.Contains(t, msg, c.want)
			require.Equal(t, c.workspace, de.Workspace)
			if c.workspace != "" {
				require.Contains(t, msg, `workspace "`+c.workspace+`"`)
			}
		})
	}
}

// FuzzParseDSN checks, for any input, that parsing neither panics nor puts
// the password or the DSN into an error, and that tenantpg's own parameters
// never reach pgx's run-time parameters. Its seed corpus runs with the
// normal tests.
func FuzzParseDSN(f *testing.F) {
	for _, s := range []string{
		"postgres://app:" + dsnPassword + "@db:5432/ws?workspace=a&pool_max_conns=3",
		"postgres://app:" + dsnPassword + "@db:5432/ws?pool_reserved_conns=x",
		"postgres://app:" + dsnPassword + "@[::1]:5432/ws?sslmode=verify-full&sslrootcert=/nope",
		"host=db user=app password='" + dsnPassword + "' dbname=ws workspace=w",
		"host=db user=app password=" + dsnPassword + " dbname=ws pool_max_conns=999999999999999999999",
		"postgres://app:" + dsnPassword + "@db:99999/ws",
		"postgres://app:" + dsnPassword + "@db/ws?workspace=%ff",
		"host=db password=" + dsnPassword + " port=1,2",
		"host=db sslpassword=" + dsnPassword + " sslkey=/nope sslmode=require dbname=ws",
		"postgres://app@db/ws?sslpassword=" + dsnPassword + "&sslcert=/nope&sslkey=/nope",
		"", "=", "postgres://", "host='", "password=" + dsnPassword,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, dsn string) {
		p, err := parseDSN(dsn)
		if err != nil {
			_, secrets := dsnHints(dsn)
			msg := err.Error()
			if len(dsn) >= 8 && strings.Contains(msg, dsn) {
				t.Fatalf("error contains the DSN: %q", msg)
			}
			// The label (the database name or workspace the error names on
			// purpose) may hold anything a fuzzed DSN puts there; outside it
			// the error must echo no password, nor the distinctive string
			// wherever it sits in the DSN.
			var de *DSNError
			rest := msg
			if errors.As(err, &de) && de.Workspace != "" {
				rest = strings.Replace(msg, fmt.Sprintf("%q", de.Workspace), "", 1)
			}
			for _, s := range secrets {
				if len(s) >= 3 && strings.Contains(rest, s) {
					t.Fatalf("error contains the password %q: %q", s, msg)
				}
			}
			if strings.Contains(dsn, dsnPassword) && strings.Contains(rest, dsnPassword) {
				t.Fatalf("error contains the password: %q", msg)
			}
			return
		}
		for _, k := range []string{paramWorkspace, paramMaxConns, paramReserved} {
			if _, ok := p.cfg.RuntimeParams[k]; ok {
				t.Fatalf("%s left in run-time parameters", k)
			}
		}
		if validWorkspace(p.workspace) != "" && p.workspace != p.cfg.Database {
			t.Fatalf("invalid workspace accepted: %q", p.workspace)
		}
	})
}

func TestConfigValidation(t *testing.T) {
	c, err := Config{}.normalize()
	require.NoError(t, err)
	require.Equal(t, Config{MaxConnections: 80, MaxConnectionsPerDB: 3, ConnMaxLifetime: 10 * time.Minute,
		ConnMaxIdleTime: 5 * time.Minute, AcquireTimeout: 10 * time.Second, Name: "tenantpg"}, c)
	for _, bad := range []struct {
		cfg   Config
		field string
	}{
		{Config{MaxConnections: -1}, "MaxConnections"},
		{Config{MaxConnectionsPerDB: -3}, "MaxConnectionsPerDB"},
		{Config{MaxConnections: 2, MaxConnectionsPerDB: 3}, "MaxConnectionsPerDB"},
		{Config{ConnMaxLifetime: -time.Second}, "ConnMaxLifetime"},
		{Config{ConnMaxIdleTime: -time.Second}, "ConnMaxIdleTime"},
		{Config{AcquireTimeout: -time.Second}, "AcquireTimeout"},
		{Config{LeakThreshold: -time.Second}, "LeakThreshold"},
	} {
		_, err := NewDriver(bad.cfg)
		var ce *ConfigError
		require.ErrorAs(t, err, &ce, "%+v", bad.cfg)
		require.Equal(t, bad.field, ce.Field)
	}
}

func TestConfigFromEnv(t *testing.T) {
	t.Setenv(EnvMaxConnections, "40")
	t.Setenv(EnvMaxConnectionsPerDB, "4")
	t.Setenv(EnvConnMaxLifetime, "2m")
	t.Setenv(EnvConnMaxIdleTime, "30s")
	t.Setenv(EnvAcquireTimeout, "750ms")
	t.Setenv(EnvLeakThreshold, "2m")
	c, err := ConfigFromEnv()
	require.NoError(t, err)
	require.Equal(t, Config{MaxConnections: 40, MaxConnectionsPerDB: 4, ConnMaxLifetime: 2 * time.Minute,
		ConnMaxIdleTime: 30 * time.Second, AcquireTimeout: 750 * time.Millisecond, LeakThreshold: 2 * time.Minute}, c)
	t.Setenv(EnvLeakThreshold, "0s")
	_, err = ConfigFromEnv()
	require.ErrorContains(t, err, EnvLeakThreshold, "a threshold of zero is unset, not 0s")
	t.Setenv(EnvLeakThreshold, "")

	t.Setenv(EnvConnMaxIdleTime, "5 minutes")
	_, err = ConfigFromEnv()
	require.ErrorContains(t, err, EnvConnMaxIdleTime)
	t.Setenv(EnvConnMaxIdleTime, "")
	t.Setenv(EnvMaxConnections, "0")
	_, err = ConfigFromEnv()
	require.ErrorContains(t, err, EnvMaxConnections)
}

// TestRegisteredDriver uses sql.Open("tenantpg", …) exactly as an
// application would, configured from the environment on first use.
var registeredRuns atomic.Int64

func TestRegisteredDriver(t *testing.T) {
	require.True(t, slices.Contains(sql.Drivers(), "tenantpg"))
	e := newEnv(t, 2, Config{MaxConnections: 5})
	defaultDriver = newDefaultDriver() // a fresh registered driver, for this test only
	// sql.Register panics on a second registration of a name: a new name
	// per run keeps the test repeatable with -count.
	name := fmt.Sprintf("tenantpg-registered-test-%d", registeredRuns.Add(1))
	sql.Register(name, defaultDriver)
	t.Cleanup(func() { defaultDriver.Close() })
	t.Setenv(EnvMaxConnections, "5")
	t.Setenv(EnvMaxConnectionsPerDB, "2")

	db, err := sql.Open(name, e.dsn(0, "workspace=registered"))
	require.NoError(t, err)
	defer db.Close()
	var v string
	require.NoError(t, db.QueryRowContext(context.Background(), "SELECT v FROM kv WHERE id = 1").Scan(&v))
	require.Equal(t, "v1", v)
	s := Default().Stats()
	require.Equal(t, 5, s.Limit, "the environment applies on first use")
	require.Equal(t, 2, dbStats(s, "registered").Cap)

	require.NoError(t, Configure(Config{MaxConnections: 4, MaxConnectionsPerDB: 1}))
	require.Equal(t, 4, Default().Stats().Limit)
	require.Error(t, Configure(Config{MaxConnections: 1, MaxConnectionsPerDB: 2}))

	odb, err := OpenDB(e.dsn(1, "workspace=opendb"))
	require.NoError(t, err)
	defer odb.Close()
	require.Equal(t, 0, odb.Stats().MaxOpenConnections, "OpenDB leaves database/sql's queue to the driver")
}

// TestSecretsNeverLeak drives every error path a test can reach with a
// distinctive password, with debug logging on, and checks every error (as
// text and formatted with %+v and %#v), every log line and the stats JSON.
func TestSecretsNeverLeak(t *testing.T) {
	var logs syncBuffer
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e := newEnv(t, 2, Config{MaxConnections: 2, MaxConnectionsPerDB: 1, AcquireTimeout: 300 * time.Millisecond, Logger: logger})
	ctx := context.Background()
	const wrongPassword = "wr0ng-Pa55-plugh"
	var errs []error
	collect := func(what string, err error) {
		t.Helper()
		require.Error(t, err, what)
		errs = append(errs, err)
	}
	ping := func(dsn string) error {
		db, err := e.drv.OpenDB(dsn)
		if err != nil {
			return err
		}
		defer db.Close()
		return db.PingContext(ctx)
	}
	refused, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	refusedAddr := refused.Addr().String()
	require.NoError(t, refused.Close())
	hung, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer hung.Close() // accepts into its backlog, never answers

	// The server's limit below the budget (53300), then the budget itself.
	e.setRoleLimit(1)
	a, b := e.open(0), e.open(1)
	pinned, err := a.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))
	collect("server limit (53300)", b.PingContext(ctx))
	e.setRoleLimit(2)
	pinnedB, err := b.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinnedB.PingContext(ctx))
	third, err := e.drv.OpenDB(e.dsn(1, "workspace=third"))
	require.NoError(t, err)
	defer third.Close()
	collect("budget exhausted", third.PingContext(ctx))
	require.NoError(t, pinned.Close())
	require.NoError(t, pinnedB.Close())
	// A query error from the server.
	_, err = a.ExecContext(ctx, "SELECT no_such_column FROM kv")
	collect("query error", err)

	// DSN errors, URL and keyword/value.
	collect("bad pool_max_conns", ping(e.dsn(0, "pool_max_conns=many")))
	collect("unknown pool_ parameter", ping(e.dsn(0, "pool_min_conns=1")))
	collect("reservation over the budget", ping(e.dsn(0, "pool_reserved_conns=3")))
	collect("bad port, URL", ping("postgres://app:"+testPassword+"@localhost:99999/db?workspace=badport"))
	collect("bad port, keyword/value", ping("host=localhost port=notaport user=app password='"+testPassword+"' dbname=db"))
	collect("unterminated quote", ping("host=localhost password='"+testPassword+" dbname=db"))
	// Dial errors: no such database, wrong password, refused, hung.
	collect("no such database", ping(strings.Replace(e.dsn(0), e.dbs[0], e.dbs[0]+"_missing", 1)))
	// A login refused by scram: a role that does not exist, with a
	// password of its own.
	collect("no such role", ping(strings.Replace(strings.Replace(e.dsn(0), testPassword, wrongPassword, 1), e.role+":", "nosuchrole:", 1)))
	collect("refused", ping("postgres://app:"+testPassword+"@"+refusedAddr+"/db?sslmode=disable&workspace=refused"))
	collect("hung", ping("postgres://app:"+testPassword+"@"+hung.Addr().String()+"/db?sslmode=disable&workspace=hung"))
	var ce *ConnectError
	require.ErrorAs(t, errs[9], &ce, "a missing database is a ConnectError")
	require.Equal(t, e.dbs[0]+"_missing", ce.Workspace, "the workspace defaults to the database name")
	require.ErrorIs(t, errs[1], ErrBudgetExhausted)

	js, err := json.Marshal(e.drv.Stats())
	require.NoError(t, err)
	require.NoError(t, e.drv.Close())
	collect("driver closed", ping(e.dsn(0)))

	texts := []string{string(js)}
	for _, err := range errs {
		texts = append(texts, err.Error(), fmt.Sprintf("%+v", err), fmt.Sprintf("%#v", err))
	}
	texts = append(texts, logs.String())
	require.Contains(t, logs.String(), `"level":"WARN"`, "the failures were logged")
	for _, s := range texts {
		require.NotContains(t, s, testPassword)
		require.NotContains(t, s, wrongPassword)
		require.NotContains(t, s, "postgres://")
	}
	for i, err := range errs {
		require.Empty(t, secretIn(err, testPassword, wrongPassword), "error %d: %v", i, err)
	}
}

// TestDialErrorsHoldNoSecret dials the scram server with the role's real
// name and a wrong password, and a hung host until the circuit opens: what
// the caller gets names the server's SQLSTATE and the network's and
// context's errors as before, but neither errors.As nor a walk of every
// field reaches pgx's *pgconn.ConnectError, whose Config holds the
// password.
func TestDialErrorsHoldNoSecret(t *testing.T) {
	var logs syncBuffer
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e := newEnv(t, 1, Config{MaxConnections: 2, AcquireTimeout: 5 * time.Second, Logger: logger})
	e.drv.b.hungDialAfter = 200 * time.Millisecond // below the hung caller's deadline; set before any dial
	const wrongPassword = "wr0ng-Pa55-plugh"

	wrong, err := e.drv.OpenDB(strings.Replace(e.dsn(0, "workspace=wrong"), testPassword, wrongPassword, 1))
	require.NoError(t, err)
	defer wrong.Close()
	err = wrong.PingContext(context.Background())
	var ce *ConnectError
	require.ErrorAs(t, err, &ce)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "28P01", pgErr.Code)
	require.False(t, errors.As(err, new(*pgconn.ConnectError)), "pgx's ConnectError, and its Config, must not be reachable")
	require.Empty(t, secretIn(err, wrongPassword, testPassword))
	require.NotContains(t, fmt.Sprintf("%v %+v %#v", err, err, err), wrongPassword)

	h := newHalfOpen(t)
	hung, err := e.drv.OpenDB("postgres://" + e.role + ":" + testPassword + "@" + h.ln.Addr().String() + "/hung?sslmode=disable&workspace=hung")
	require.NoError(t, err)
	defer hung.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	err = hung.PingContext(ctx)
	cancel()
	var de *ServerDownError
	require.ErrorAs(t, err, &de)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.False(t, errors.As(err, new(*pgconn.ConnectError)), "pgx's ConnectError, and its Config, must not be reachable")
	require.Empty(t, secretIn(err, testPassword))
	require.NotContains(t, fmt.Sprintf("%v %+v %#v", err, err, err), testPassword)

	js, err := json.Marshal(e.drv.Stats())
	require.NoError(t, err)
	for _, s := range []string{string(js), logs.String()} {
		require.NotContains(t, s, testPassword)
		require.NotContains(t, s, wrongPassword)
	}
}

// secretIn returns the path to the first value reachable from v, through
// unexported fields too, that is a pgconn.Config or pgx.ConnConfig or a
// string holding one of secrets; "" if there is none. Formatting an error
// shows only what its Error method chooses to, and errors.As only the
// types asked for: a secret can hide anywhere else.
func secretIn(v any, secrets ...string) string {
	type visit struct {
		p uintptr
		t reflect.Type
	}
	seen := map[visit]bool{}
	configs := []reflect.Type{reflect.TypeFor[pgconn.Config](), reflect.TypeFor[pgx.ConnConfig]()}
	var walk func(v reflect.Value, path string) string
	walk = func(v reflect.Value, path string) string {
		switch v.Kind() {
		case reflect.Pointer:
			if v.IsNil() || seen[visit{v.Pointer(), v.Type()}] {
				return ""
			}
			seen[visit{v.Pointer(), v.Type()}] = true
			return walk(v.Elem(), "(*"+path+")")
		case reflect.Interface:
			if v.IsNil() {
				return ""
			}
			return walk(v.Elem(), path+".("+v.Elem().Type().String()+")")
		case reflect.Struct:
			if slices.Contains(configs, v.Type()) {
				return path + " is a " + v.Type().String()
			}
			for i := range v.NumField() {
				if p := walk(v.Field(i), path+"."+v.Type().Field(i).Name); p != "" {
					return p
				}
			}
		case reflect.Slice, reflect.Array:
			for i := range v.Len() {
				if p := walk(v.Index(i), fmt.Sprintf("%s[%d]", path, i)); p != "" {
					return p
				}
			}
		case reflect.Map:
			for it := v.MapRange(); it.Next(); {
				if p := walk(it.Key(), path+"[key]"); p != "" {
					return p
				}
				if p := walk(it.Value(), path+"[value]"); p != "" {
					return p
				}
			}
		case reflect.String:
			for _, s := range secrets {
				if strings.Contains(v.String(), s) {
					return path + " holds a password"
				}
			}
		}
		return ""
	}
	return walk(reflect.ValueOf(v), "err")
}

func TestStatsJSONFieldNames(t *testing.T) {
	js, err := json.Marshal(Stats{Databases: []DatabaseStats{{}}, Servers: []ServerStats{{}}})
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(js, &m))
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	require.Equal(t, []string{"activeDatabases", "closing", "collections", "databases", "dialErrors", "dialTimeNs", "dialing", "dials", "evictions",
		"handoffs", "idle", "inUse", "limit", "longestUseNs", "open", "peakOpen", "reserved", "servers", "suspectedLeaks", "timeouts", "waitCount",
		"waitDurationNs", "waiting"}, keys)
	db := m["databases"].([]any)[0].(map[string]any)
	keys = keys[:0]
	for k := range db {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	require.Equal(t, []string{"cap", "closing", "database", "dialing", "evictions", "idle", "inUse", "lastUsed", "longestUseNs", "open", "pool", "reserved", "useTimeNs", "waiting", "workspace"}, keys)
	srv := m["servers"].([]any)[0].(map[string]any)
	keys = keys[:0]
	for k := range srv {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	require.Equal(t, []string{"closing", "dialSlots", "dialing", "down", "downForNs", "downSince", "failedWaits", "idle", "inUse",
		"lastError", "limit", "open", "outages", "peakOpen", "reserved", "server", "waiting"}, keys, "fleet is omitted without a fleet budget")

	// With a fleet budget the server carries its coordination's figures,
	// camelCase like the rest.
	js, err = json.Marshal(ServerStats{Fleet: &FleetStats{}})
	require.NoError(t, err)
	var sv map[string]any
	require.NoError(t, json.Unmarshal(js, &sv))
	fleet := sv["fleet"].(map[string]any)
	keys = keys[:0]
	for k := range fleet {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	require.Equal(t, []string{"connected", "failures", "fairShare", "lastError", "leased", "members", "released", "roundTrips", "share", "squatters"}, keys)
	js, err = json.Marshal(FleetSquatter{})
	require.NoError(t, err)
	require.JSONEq(t, `{"role": "", "pid": 0, "slots": 0}`, string(js))
}
