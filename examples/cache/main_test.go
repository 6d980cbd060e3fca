package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestCacheAcrossUpgrades: the cache is warm in the new process: every key
// the old one had is a hit at once after the upgrade, and the first
// requests are as fast as before it; with -no-state every one is a miss
// and pays the lookup.
func TestCacheAcrossUpgrades(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const keys = 100
	for _, c := range []struct {
		name string
		args []string
		warm bool
	}{{"state handed over", []string{"-lookup", "10ms"}, true}, {"no state", []string{"-lookup", "10ms", "-no-state"}, false}} {
		t.Run(c.name, func(t *testing.T) {
			srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/cache", loadtest.Config{Args: c.args})
			client := &http.Client{Timeout: 10 * time.Second}
			get := func(key int) (string, time.Duration) {
				start := time.Now()
				resp, err := client.Get(fmt.Sprintf("http://%s/item?key=%d", srv.Addr, key))
				require.NoError(t, err)
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				require.Equal(t, http.StatusOK, resp.StatusCode)
				return resp.Header.Get("X-Cache"), time.Since(start)
			}
			for k := range keys {
				hit, _ := get(k)
				require.Equal(t, "miss", hit, "a cold start")
			}
			for range 2 {
				_, err := srv.Upgrade(ctx, time.Minute)
				require.NoError(t, err)
				hits := 0
				var lat []time.Duration
				for k := range keys {
					hit, d := get(k)
					if hit == "hit" {
						hits++
					}
					lat = append(lat, d)
				}
				slices.Sort(lat)
				t.Logf("after the upgrade: %d of %d hits, p50 %v, p99 %v", hits, keys, lat[len(lat)/2], lat[len(lat)*99/100])
				if c.warm {
					assert.Equal(t, keys, hits, "every key the old process had")
				} else {
					assert.Zero(t, hits, "cold: every key is looked up again")
				}
			}
		})
	}
}
