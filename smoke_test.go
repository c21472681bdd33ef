package tenantpg

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSmoke(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 2, MaxConnectionsPerDB: 1})
	ctx := context.Background()
	for round := 0; round < 3; round++ {
		for i := 0; i < 3; i++ {
			db := e.open(i)
			var v string
			require.NoError(t, db.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = $1", 3).Scan(&v))
			require.Equal(t, "v3", v)
		}
	}
	t.Logf("%+v", e.drv.Stats())
	e.requireQuiescent()
}
