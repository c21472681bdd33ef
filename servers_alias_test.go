package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestServerAliasesShareOneBudget reaches one server as localhost and as
// 127.0.0.1: two budgets without an alias, one with it.
func TestServerAliasesShareOneBudget(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4}) // the role's limit: room for the 3 of two budgets
	if e.srv.Host != "127.0.0.1" {
		t.Skip("the server named by the environment is not on 127.0.0.1")
	}
	port := fmt.Sprint(e.srv.Port)
	byName := func(t *testing.T, drv *Driver, host string) *sql.DB {
		dsn := strings.Replace(e.dsn(0), "127.0.0.1:"+port, host+":"+port, 1)
		db, err := drv.OpenDB(dsn)
		require.NoError(t, err)
		t.Cleanup(func() { db.Close() })
		return db
	}
	ctx := context.Background()
	hold := func(t *testing.T, db *sql.DB) *sql.Conn {
		c, err := db.Conn(ctx)
		require.NoError(t, err)
		require.NoError(t, c.PingContext(ctx))
		return c
	}

	t.Run("without an alias, two budgets", func(t *testing.T) {
		drv, err := NewDriver(Config{MaxConnections: 2, MaxConnectionsPerDB: 2})
		require.NoError(t, err)
		defer drv.Close()
		a, b := byName(t, drv, "localhost"), byName(t, drv, "127.0.0.1")
		c1, c2, c3 := hold(t, a), hold(t, a), hold(t, b)
		require.Len(t, drv.Stats().Servers, 2)
		require.Equal(t, 3, drv.Stats().Open, "two names of one server: 3 backends on a budget of 2")
		for _, c := range []*sql.Conn{c1, c2, c3} {
			require.NoError(t, c.Close())
		}
	})
	t.Run("with an alias, one budget", func(t *testing.T) {
		drv, err := NewDriver(Config{MaxConnections: 2, MaxConnectionsPerDB: 2, AcquireTimeout: 300 * time.Millisecond,
			ServerAliases: map[string]string{"localhost:" + port: "127.0.0.1:" + port}})
		require.NoError(t, err)
		defer drv.Close()
		a, b := byName(t, drv, "localhost"), byName(t, drv, "127.0.0.1")
		c1, c2 := hold(t, a), hold(t, a)
		_, err = b.Conn(ctx)
		if err == nil {
			var c *sql.Conn
			c, err = b.Conn(ctx)
			if err == nil {
				err = c.PingContext(ctx)
				c.Close()
			}
		}
		require.True(t, errors.Is(err, ErrBudgetExhausted), "the alias shares the budget: got %v", err)
		s := drv.Stats()
		require.Len(t, s.Servers, 1)
		require.Equal(t, "127.0.0.1:"+port, s.Servers[0].Server)
		require.Equal(t, 2, s.PeakOpen)
		require.NoError(t, c1.Close())
		require.NoError(t, c2.Close())
	})
	t.Run("aliases cannot change while pools are open", func(t *testing.T) {
		drv, err := NewDriver(Config{MaxConnections: 2})
		require.NoError(t, err)
		defer drv.Close()
		byName(t, drv, "localhost")
		err = drv.Configure(Config{MaxConnections: 2, ServerAliases: map[string]string{"localhost:" + port: "127.0.0.1:" + port}})
		var ce *ConfigError
		require.True(t, errors.As(err, &ce))
		require.Equal(t, "ServerAliases", ce.Field)
	})
}

func TestServerAliasesConfig(t *testing.T) {
	for _, c := range []struct {
		aliases map[string]string
		field   string
	}{
		{map[string]string{"localhost": "127.0.0.1:5432"}, "ServerAliases"},
		{map[string]string{"localhost:5432": "127.0.0.1"}, "ServerAliases[localhost:5432]"},
		{map[string]string{"a:1": "b:1", "b:1": "c:1"}, ""},
	} {
		_, err := Config{ServerAliases: c.aliases}.normalize()
		var ce *ConfigError
		require.True(t, errors.As(err, &ce), "%v: %v", c.aliases, err)
		if c.field != "" {
			require.Equal(t, c.field, ce.Field)
		}
	}
	cfg, err := Config{ServerAliases: map[string]string{"db.internal:5432": "10.0.0.7:5432", "[::1]:5432": "10.0.0.7:5432"}}.normalize()
	require.NoError(t, err)
	require.Len(t, cfg.ServerAliases, 2)
}

func TestMultiHostDSNRefused(t *testing.T) {
	for _, dsn := range []string{
		"postgres://app:" + dsnPassword + "@a:5432,b:5432/ws1",
		"host=a,b user=app password=" + dsnPassword + " dbname=ws1 target_session_attrs=read-write",
	} {
		_, err := parseDSN(dsn)
		var de *DSNError
		require.True(t, errors.As(err, &de), "%v", err)
		require.Contains(t, err.Error(), "several hosts")
		require.Equal(t, "ws1", de.Workspace)
		require.NotContains(t, err.Error(), dsnPassword)
	}
	// sslmode=prefer's fallback is the same host without TLS: accepted.
	p, err := parseDSN("postgres://app:" + dsnPassword + "@a:5432/ws1?sslmode=prefer")
	require.NoError(t, err)
	require.Equal(t, serverKey{host: "a", port: 5432}, p.server)
}

// TestRoutedPingSeesTheAliasedCircuit: the health check of a routed DB
// whose DSN names its server by an alias answers from the circuit of the
// server the alias names, as its workspaces' checkouts count against it. It
// looked the circuit up by the DSN's own host and port, found none, and
// reported a server the circuit knew was down as reachable (found by the
// architecture split, #21).
func TestRoutedPingSeesTheAliasedCircuit(t *testing.T) {
	drv, err := NewDriver(Config{MaxConnections: 2,
		ServerAliases: map[string]string{"alias.example:5432": "db.example:5432"}})
	require.NoError(t, err)
	defer drv.Close()
	c, err := drv.OpenConnector("postgres://u:p@alias.example:5432/ws_" + WorkspacePlaceholder + "?sslmode=disable")
	require.NoError(t, err)
	r := c.(*router)
	r.tmpl.cfg.DialFunc = func(context.Context, string, string) (net.Conn, error) {
		client, server := net.Pipe()
		server.Close()
		return client, nil // the host accepts TCP
	}
	b := drv.b
	b.mu.Lock()
	d := addPoolLocked(b, serverKey{host: "db.example", port: 5432}, "db", "ws", 0, time.Time{})
	b.markDownLocked(d.srv, b.clock.Now().Add(-time.Second), errNotAnswering, "ws")
	b.mu.Unlock()

	err = r.ping(context.Background())
	var sde *ServerDownError
	require.ErrorAs(t, err, &sde, "the circuit of the aliased server knows it is down")
	require.Equal(t, "db.example:5432", sde.Server)
	require.Positive(t, sde.Down)
}
