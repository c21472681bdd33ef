package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestWorkspacesOpenEachOnce(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 4})
	var dsnCalls atomic.Int64
	ws, err := NewWorkspaces(WorkspacesConfig{Driver: e.drv, DSN: func(id string) (string, error) {
		dsnCalls.Add(1)
		var i int
		if _, err := fmt.Sscanf(id, "w%d", &i); err != nil || i >= len(e.dbs) {
			return "", errors.New("no such workspace")
		}
		return e.dsn(i, "workspace="+id), nil
	}})
	require.NoError(t, err)
	defer ws.Close()
	ctx := context.Background()

	var wg sync.WaitGroup
	got := make([]*sql.DB, 16)
	for g := range got {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			db, err := ws.DB(ctx, "w1")
			require.NoError(t, err)
			got[g] = db
		}(g)
	}
	wg.Wait()
	for _, db := range got {
		require.Same(t, got[0], db)
	}
	require.Equal(t, int64(1), dsnCalls.Load(), "concurrent first calls open the workspace once")
	queryOne(t, got[0])
	require.Equal(t, 0, got[0].Stats().MaxOpenConnections, "opened through OpenDB: the driver queues its callers")

	_, err = ws.DB(ctx, "w9")
	require.ErrorContains(t, err, `workspace "w9"`)
	_, err = ws.DB(ctx, "w9")
	require.Error(t, err)
	require.Equal(t, int64(3), dsnCalls.Load(), "a failed opening is not remembered")

	require.NoError(t, ws.CloseWorkspace("w1"))
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 }, e2eWait, pollEvery)
	again, err := ws.DB(ctx, "w1")
	require.NoError(t, err)
	require.NotSame(t, got[0], again)
	queryOne(t, again)

	require.NoError(t, ws.Close())
	_, err = ws.DB(ctx, "w0")
	require.ErrorIs(t, err, ErrWorkspacesClosed)
	e.requireQuiescent()
	require.Zero(t, e.drv.Stats().Open, "closing the registry gives every token back")
}

var lazyRuns atomic.Int64

func TestWorkspacesCreateIfMissing(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	var created atomic.Int64
	names := map[string]string{}
	var mu sync.Mutex
	ws, err := NewWorkspaces(WorkspacesConfig{
		Driver: e.drv,
		DSN: func(id string) (string, error) {
			mu.Lock()
			defer mu.Unlock()
			name := e.srv.Prefix + "lazy_" + id
			names[id] = name
			return strings.Replace(e.dsn(0, "workspace="+id), e.dbs[0], name, 1), nil
		},
		CreateIfMissing: func(ctx context.Context, id string) error {
			created.Add(1)
			mu.Lock()
			name := names[id]
			mu.Unlock()
			_, err := e.srv.CreateDatabases(ctx, e.role, "", strings.TrimPrefix(name, e.srv.Prefix))
			return err
		},
	})
	require.NoError(t, err)
	defer ws.Close()

	// A new workspace per run: the database outlives the test, and -count
	// would find it created already.
	id := fmt.Sprintf("fresh%d", lazyRuns.Add(1))
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			db, err := ws.DB(ctx, id)
			require.NoError(t, err)
			var one int
			require.NoError(t, db.QueryRowContext(ctx, "SELECT 1").Scan(&one))
		}()
	}
	wg.Wait()
	require.Equal(t, int64(1), created.Load(), "the database is created once")
	require.NoError(t, ws.Close())
	e.requireQuiescent()
}
