package tenantpg

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestPerServerBudgets: each server (host and port as the DSN names them)
// has its own budget. The test reaches one PostgreSQL under two names,
// 127.0.0.1 and localhost, which the driver treats as two servers: the one
// given its own figure never holds more than it, and callers of one never
// evict the other's idle backends, which its budget does not pay for.
func TestPerServerBudgets(t *testing.T) {
	const workspaces = 6
	e := newEnv(t, workspaces, Config{MaxConnections: 3, MaxConnectionsPerDB: 1})
	port := strconv.Itoa(e.srv.Port)
	if e.srv.Host != "127.0.0.1" {
		t.Skip("needs a server on 127.0.0.1, reachable as localhost too") // TENANTPG_TEST_DATABASE_URL elsewhere
	}
	other := net.JoinHostPort("localhost", port)
	require.NoError(t, e.drv.Configure(Config{MaxConnections: 3, MaxConnectionsPerDB: 1,
		ServerMaxConnections: map[string]int{other: 2}}))
	e.setRoleLimit(3 + 2)

	// Fill 127.0.0.1's budget with idle backends.
	first := make([]*sql.DB, 3)
	for i := range first {
		first[i] = e.open(i)
		currentDB(t, context.Background(), first[i])
	}
	// Load on localhost's databases: three of them on a budget of two.
	var second []*sql.DB
	for i := 3; i < workspaces; i++ {
		db, err := e.drv.OpenDB(strings.Replace(e.dsn(i), "127.0.0.1:", "localhost:", 1))
		require.NoError(t, err)
		t.Cleanup(func() { db.Close() })
		second = append(second, db)
	}
	var errs errCollector
	var wg sync.WaitGroup
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < 30; r++ {
				i := (w + r) % len(second)
				var name string
				err := second[i].QueryRowContext(context.Background(), "SELECT current_database()").Scan(&name)
				if err == nil && name != e.dbs[3+i] {
					err = fmt.Errorf("got %s, want %s", name, e.dbs[3+i])
				}
				errs.add(err)
			}
		}()
	}
	wg.Wait()
	require.Empty(t, errs.list())

	st := e.drv.Stats()
	byServer := map[string]ServerStats{}
	for _, s := range st.Servers {
		byServer[s.Server] = s
	}
	local := net.JoinHostPort("127.0.0.1", port)
	require.Equal(t, 3, byServer[local].Limit)
	require.Equal(t, 2, byServer[other].Limit)
	require.LessOrEqual(t, byServer[other].PeakOpen, 2, "localhost's budget")
	require.Equal(t, 3, byServer[local].Idle, "127.0.0.1's idle backends were evicted for another server's callers")
	for _, d := range st.Databases {
		if d.Database == e.dbs[0] || d.Database == e.dbs[1] || d.Database == e.dbs[2] {
			require.Zero(t, d.Evictions, d.Workspace)
		}
	}
	require.Equal(t, 5, st.Limit, "the sum of the servers' budgets")
	require.Zero(t, st.DialErrors["rejected"], "the server refused a dial: the budgets overlapped")
	for _, db := range first {
		require.NoError(t, db.Close())
	}
	e.requireQuiescent()
}

// TestServerMaxConnectionsValidation: keys must be host:port, figures at
// least 1, and a server's reservations must fit its own figure.
func TestServerMaxConnectionsValidation(t *testing.T) {
	for _, bad := range []map[string]int{{"db1": 5}, {"db1:0": 5}, {"db1:5432": 0}, {":5432": 3}} {
		_, err := NewDriver(Config{ServerMaxConnections: bad})
		var ce *ConfigError
		require.ErrorAs(t, err, &ce, "%v", bad)
		require.Contains(t, ce.Field, "ServerMaxConnections")
	}
	drv, err := NewDriver(Config{MaxConnections: 10, ServerMaxConnections: map[string]int{"db1:5432": 2}})
	require.NoError(t, err)
	defer drv.Close()
	_, err = drv.OpenDB("postgres://u:secret@db1:5432/a?pool_reserved_conns=3")
	require.ErrorContains(t, err, "does not fit: the budget is 2")
	require.NotContains(t, err.Error(), "secret")
	_, err = drv.OpenDB("postgres://u:secret@db1:5432/a?pool_max_conns=3")
	require.ErrorContains(t, err, "exceeds the budget of 2")
	db, err := drv.OpenDB("postgres://u:secret@db2:5432/a?pool_reserved_conns=3")
	require.NoError(t, err, "another server gets MaxConnections")
	require.NoError(t, db.Close())
}
