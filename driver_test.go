package tenantpg

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

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
			require.Equal(t, dbKey{host: "db", port: c.port, user: c.user, database: c.db}, dbKey{host: "db", port: p.key.port, user: p.key.user, database: p.key.database})
			for _, k := range []string{paramWorkspace, paramMaxConns, paramReserved} {
				require.NotContains(t, p.cfg.RuntimeParams, k, "tenantpg parameters must not reach the server")
			}
		})
	}
	t.Run("same key, different spelling", func(t *testing.T) {
		a, err := parseDSN("postgres://app:x@db:5432/ws1?workspace=one")
		require.NoError(t, err)
		b, err := parseDSN("host=db port=5432 user=app password=y dbname=ws1 workspace=uno")
		require.NoError(t, err)
		require.Equal(t, a.key, b.key)
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
	c, err := ConfigFromEnv()
	require.NoError(t, err)
	require.Equal(t, Config{MaxConnections: 40, MaxConnectionsPerDB: 4, ConnMaxLifetime: 2 * time.Minute,
		ConnMaxIdleTime: 30 * time.Second, AcquireTimeout: 750 * time.Millisecond}, c)

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
func TestRegisteredDriver(t *testing.T) {
	require.True(t, slices.Contains(sql.Drivers(), "tenantpg"))
	e := newEnv(t, 2, Config{MaxConnections: 5})
	defaultDriver = newDefaultDriver() // a fresh registered driver, for this test only
	sql.Register("tenantpg-registered-test", defaultDriver)
	t.Cleanup(func() { defaultDriver.Close() })
	t.Setenv(EnvMaxConnections, "5")
	t.Setenv(EnvMaxConnectionsPerDB, "2")

	db, err := sql.Open("tenantpg-registered-test", e.dsn(0, "workspace=registered"))
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
	require.Equal(t, 1, odb.Stats().MaxOpenConnections, "OpenDB sets database/sql's limit to the cap")
}

// TestSecretsNeverLeak drives the error paths a test can reach with a
// distinctive password and checks every error text and the stats JSON.
func TestSecretsNeverLeak(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 100 * time.Millisecond})
	ctx := context.Background()
	var texts []string
	collect := func(err error) {
		if err != nil {
			texts = append(texts, err.Error())
		}
	}
	// A DSN error, a connect error (no such database), a budget error.
	_, err := e.drv.OpenConnector(e.dsn(0, "pool_max_conns=many"))
	collect(err)
	missing, err := e.drv.OpenDB(strings.Replace(e.dsn(0), e.dbs[0], e.dbs[0]+"_missing", 1))
	require.NoError(t, err)
	defer missing.Close()
	collect(missing.PingContext(ctx))
	a, b := e.open(0), e.open(1)
	pinned, err := a.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))
	collect(b.PingContext(ctx))
	require.NoError(t, pinned.Close())
	require.Len(t, texts, 3)
	var ce *ConnectError
	require.ErrorAs(t, missing.PingContext(ctx), &ce, "a missing database is a ConnectError")
	require.Equal(t, e.dbs[0]+"_missing", ce.Workspace, "the workspace defaults to the database name")

	js, err := json.Marshal(e.drv.Stats())
	require.NoError(t, err)
	texts = append(texts, string(js))
	for _, s := range texts {
		require.NotContains(t, s, testPassword)
		require.NotContains(t, s, "postgres://")
	}
}

func TestStatsJSONFieldNames(t *testing.T) {
	js, err := json.Marshal(Stats{Databases: []DatabaseStats{{}}})
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(js, &m))
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	require.Equal(t, []string{"activeDatabases", "closing", "databases", "dialErrors", "dialing", "dials", "evictions",
		"idle", "inUse", "limit", "longestUseNs", "open", "peakOpen", "reserved", "timeouts", "waitCount", "waitDurationNs", "waiting"}, keys)
	db := m["databases"].([]any)[0].(map[string]any)
	keys = keys[:0]
	for k := range db {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	require.Equal(t, []string{"cap", "closing", "database", "dialing", "evictions", "idle", "inUse", "lastUsed", "longestUseNs", "open", "reserved", "workspace"}, keys)
}
