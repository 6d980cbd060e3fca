// Command cache shows state carried across an upgrade: GET /item?key=K
// answers from an in-memory cache filled by a slow lookup (-lookup, 20 ms
// by default), with the header X-Cache: hit or miss. At each upgrade the
// cache is offered to the new process (graceful's OfferState), which
// starts warm instead of cold: the first requests after an upgrade are as
// fast as before it. -no-state turns the hand-over off.
//
//	flags  -addr host:port (default 127.0.0.1:8081), -pidfile path,
//	       -lookup duration, -no-state
//	GET /item?key=K   the item, X-Cache hit|miss, X-Pid
//	GET /readyz       200 while ready
//	SIGHUP upgrades in place; SIGTERM drains and exits 0.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/graceful-go/graceful"
)

// cacheVersion is the format of the cache this build offers and reads.
const cacheVersion = 1

func main() {
	addr := flag.String("addr", "127.0.0.1:8081", "TCP address to serve on")
	pidfile := flag.String("pidfile", "", "write the PID of the serving process here")
	lookup := flag.Duration("lookup", 20*time.Millisecond, "how long a cache miss takes")
	noState := flag.Bool("no-state", false, "do not hand the cache to the new process at upgrades")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(log, *addr, *pidfile, *lookup, !*noState); err != nil {
		log.Error("exiting", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, addr, pidfile string, lookup time.Duration, handOver bool) error {
	p, err := graceful.New(graceful.Options{Logger: log, PIDFile: pidfile})
	if err != nil {
		return err
	}
	c := &cache{items: map[string]string{}, lookup: lookup}
	if handOver {
		// Warm: what the previous process had, in a format this build reads.
		switch b, _, err := p.State("cache", cacheVersion); {
		case err == nil:
			if err := json.Unmarshal(b, &c.items); err != nil {
				log.Warn("cache from the previous process unreadable; starting cold", "err", err)
				c.items = map[string]string{}
			} else {
				log.Info("cache from the previous process", "items", len(c.items))
			}
			p.ReleaseState() // decoded: the mapping is not needed any more
		case !errors.Is(err, graceful.ErrNoState):
			log.Warn("starting cold", "err", err) // another version
		}
		p.OfferState("cache", cacheVersion, c.snapshot)
	}
	ln, err := p.Listen("tcp", addr)
	if err != nil {
		return err
	}
	pid := strconv.Itoa(os.Getpid())
	mux := http.NewServeMux()
	mux.Handle("GET /readyz", p.Health().Readiness())
	mux.HandleFunc("GET /item", func(w http.ResponseWriter, r *http.Request) {
		v, hit := c.get(r.URL.Query().Get("key"))
		w.Header().Set("X-Pid", pid)
		if hit {
			w.Header().Set("X-Cache", "hit")
		} else {
			w.Header().Set("X-Cache", "miss")
		}
		fmt.Fprintln(w, v)
	})
	p.Serve(&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln)
	return p.Run(context.Background())
}

// cache holds what the slow lookup found.
type cache struct {
	lookup time.Duration
	mu     sync.Mutex
	items  map[string]string
}

func (c *cache) get(key string) (string, bool) {
	c.mu.Lock()
	v, ok := c.items[key]
	c.mu.Unlock()
	if ok {
		return v, true
	}
	time.Sleep(c.lookup) // the slow lookup: a database, another service
	v = "value of " + key
	c.mu.Lock()
	c.items[key] = v
	c.mu.Unlock()
	return v, false
}

// snapshot is the cache as the upgrade begins.
func (c *cache) snapshot() ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return json.Marshal(c.items)
}
