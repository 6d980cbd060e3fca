package graceful

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"
)

// This file holds the hand-over of application state across an upgrade:
// named, versioned payloads the old process offers and the new one reads
// before it declares itself ready.
//
// The payloads travel in one file, a memfd on Linux (an unlinked temporary
// file elsewhere), whose descriptor the old process sends on the hand-off
// channel before it starts the new one: each payload is copied once, into
// the file, with no reader to wait for; the new process maps the file
// (copy-on-write) instead of reading it, so that what it does not touch
// costs it nothing (BenchmarkStateHandOver measures this against a pipe).
//
// The file: stateMagic, then for each payload its name's length (uint16),
// the name, its version (int64) and its length (uint64), then its bytes;
// big-endian.

// DefaultMaxStateSize bounds the state a new process reads when
// Options.MaxStateSize is zero.
const DefaultMaxStateSize = 1 << 30

// stateMagic starts a state file; its last byte is the format's version.
const stateMagic = "GRACEFUL-STATE\x00\x01"

// ErrNoState is returned by [Process.State] when the previous process
// offered nothing under the name (or this process started cold).
var ErrNoState = errors.New("graceful: no state under that name")

// offer is one payload a process offers to its successor.
type offer struct {
	version  int
	snapshot func() ([]byte, error)
}

// states is the state a process offers, and what it received.
type states struct {
	mu       sync.Mutex
	offers   map[string]offer
	received map[string]statePayload
	mapping  []byte // the received file, mapped; nil once released
}

// maxStatePayloads bounds how many payloads a state file may hold: each
// costs this process a map entry whatever its size.
const maxStatePayloads = 4096

type statePayload struct {
	version int
	data    []byte
}

// OfferState registers a payload for the process that replaces this one:
// at each upgrade attempt, just before the new process starts, snapshot is
// called and its bytes reach the new process whole (see [Process.State]),
// with version naming their format. A snapshot that fails is logged and
// left out: the new process starts cold for that name.
//
// The consistency rule: the new process gets the state as it was when the
// upgrade began. What this process changes afterwards (it serves until the
// new one is ready, through any probation) is not carried; nor is anything
// if the attempt fails or is rolled back, and this process's own state is
// never touched. A cache loses only the entries filled in that window. A
// figure that must lose no update, such as a counter, is best kept where
// both processes see it (a file or shared memory of your own, an external
// store); offered here, its updates during the upgrade are lost.
//
// A name is 1 to 255 bytes; offering a name again replaces its payload; at
// most 4,096 names. A snapshot that panics, or takes over 10 s, is left out
// like a failing one. It returns an error for a bad name or a nil
// snapshot.
func (p *Process) OfferState(name string, version int, snapshot func() ([]byte, error)) error {
	if name == "" || len(name) > 255 {
		return fmt.Errorf("graceful: OfferState: name %q: want 1 to 255 bytes", name)
	}
	if snapshot == nil {
		return fmt.Errorf("graceful: OfferState %q: nil snapshot", name)
	}
	p.state.mu.Lock()
	defer p.state.mu.Unlock()
	if p.state.offers == nil {
		p.state.offers = make(map[string]offer)
	}
	p.state.offers[name] = offer{version, snapshot}
	return nil
}

// State returns the payload the previous process offered under name (see
// [Process.OfferState]) and its version, provided the version is one of
// versions (any, if none is given). Read it after [New] and before
// declaring the process ready: in main, or in a pre-ready check that
// depends on it. It returns [ErrNoState] when there is nothing under name:
// a cold start, a previous process that offered nothing, or state that
// could not be read (logged by New, with why). A version this binary does
// not accept (say, after a rollback to an older one) returns an error that
// names it, and the log says the process starts cold for that name. The
// data is a private (copy-on-write) mapping of what the old process sent,
// shared by every call for the same name: modify it only if you call once.
// It stays mapped until [Process.ReleaseState]: call that once you have
// decoded it into structures of your own, or the process holds it twice.
func (p *Process) State(name string, versions ...int) ([]byte, int, error) {
	p.state.mu.Lock()
	got, ok := p.state.received[name]
	p.state.mu.Unlock()
	if !ok {
		return nil, 0, ErrNoState
	}
	if len(versions) > 0 && !slices.Contains(versions, got.version) {
		err := fmt.Errorf("graceful: state %q: version %d not understood (this build reads %v)", name, got.version, versions)
		p.log.Warn("state from the previous process not understood; starting cold", "name", name, "version", got.version, "understood", versions)
		return nil, got.version, err
	}
	return got.data, got.version, nil
}

// ReleaseState unmaps the state received from the previous process: the
// slices [Process.State] returned must not be used afterwards, and State
// returns [ErrNoState] from then on. Call it once the state is decoded
// (keep it mapped instead if you use the bytes as they are). Idempotent.
func (p *Process) ReleaseState() {
	p.state.mu.Lock()
	defer p.state.mu.Unlock()
	if p.state.mapping != nil {
		unmapState(p.state.mapping)
	}
	p.state.mapping, p.state.received = nil, nil
}

// snapshotTimeout bounds a user's snapshot: it must not hold an upgrade.
const snapshotTimeout = 10 * time.Second

// takeSnapshot calls snapshot, turning a panic into an error and giving up
// on it after d (it then finishes on its own, its result dropped).
func takeSnapshot(snapshot func() ([]byte, error), d time.Duration) ([]byte, error) {
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer func() {
			if v := recover(); v != nil {
				done <- result{nil, fmt.Errorf("snapshot panicked: %v", v)}
			}
		}()
		b, err := snapshot()
		done <- result{b, err}
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case r := <-done:
		return r.b, r.err
	case <-t.C:
		return nil, fmt.Errorf("snapshot took over %v", d)
	}
}

// maxStateFraming bounds what a state file holds besides its payloads: the
// magic, and each payload's name and header.
const maxStateFraming = int64(len(stateMagic)) + maxStatePayloads*(2+255+16)

// writeState takes a snapshot of every offer and writes them to f; it
// returns how many it wrote and the file's size. Payloads of more than
// limit bytes in all (Options.MaxStateSize: a successor that shares it
// would refuse them) are not written at all: it fails before writing.
func (p *Process) writeState(f io.Writer, limit int64) (n int, size int64, err error) {
	p.state.mu.Lock()
	names := make([]string, 0, len(p.state.offers))
	for name := range p.state.offers {
		names = append(names, name)
	}
	offers := make(map[string]offer, len(names))
	for k, v := range p.state.offers {
		offers[k] = v
	}
	p.state.mu.Unlock()
	slices.Sort(names)
	snaps := make([][]byte, len(names))
	var total int64
	for i, name := range names {
		start := time.Now()
		data, err := takeSnapshot(offers[name].snapshot, snapshotTimeout)
		if err != nil {
			p.log.Warn("state not offered: its snapshot failed; the new process starts cold for it", "name", name, "err", err)
			names[i] = "" // left out
			continue
		}
		snaps[i] = data
		total += int64(len(data))
		p.log.Debug("state snapshot", "name", name, "bytes", len(data), "took", time.Since(start))
	}
	if total > limit {
		return 0, 0, fmt.Errorf("state of %d bytes is over the limit of %d (Options.MaxStateSize); nothing written", total, limit)
	}
	if _, err := io.WriteString(f, stateMagic); err != nil {
		return 0, 0, err
	}
	size = int64(len(stateMagic))
	for i, name := range names {
		if name == "" {
			continue
		}
		o, data := offers[name], snaps[i]
		var hdr bytes.Buffer
		binary.Write(&hdr, binary.BigEndian, uint16(len(name)))
		hdr.WriteString(name)
		binary.Write(&hdr, binary.BigEndian, int64(o.version))
		binary.Write(&hdr, binary.BigEndian, uint64(len(data)))
		if _, err := f.Write(hdr.Bytes()); err != nil {
			return n, size, err
		}
		if _, err := f.Write(data); err != nil {
			return n, size, err
		}
		n++
		size += int64(hdr.Len() + len(data))
		snaps[i] = nil
		p.log.Debug("state offered", "name", name, "version", o.version, "bytes", len(data))
	}
	return n, size, nil
}

// parseState parses a state file's bytes.
func parseState(b []byte) (map[string]statePayload, error) {
	if !bytes.HasPrefix(b, []byte(stateMagic[:len(stateMagic)-1])) {
		return nil, errors.New("not a state file")
	}
	if len(b) < len(stateMagic) || b[len(stateMagic)-1] != stateMagic[len(stateMagic)-1] {
		return nil, errors.New("state file of an unknown format (a newer version of graceful?)")
	}
	b = b[len(stateMagic):]
	got := make(map[string]statePayload)
	for len(b) > 0 {
		if len(b) < 2 {
			return nil, errors.New("state file truncated in a name's length")
		}
		nl := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if len(b) < nl+16 {
			return nil, errors.New("state file truncated in a payload's header")
		}
		name := string(b[:nl])
		if _, dup := got[name]; dup {
			return nil, fmt.Errorf("state %q twice", name)
		}
		if len(got) == maxStatePayloads {
			return nil, fmt.Errorf("state file of more than %d payloads", maxStatePayloads)
		}
		version := int(int64(binary.BigEndian.Uint64(b[nl:])))
		size := binary.BigEndian.Uint64(b[nl+8:])
		b = b[nl+16:]
		if size > uint64(len(b)) {
			return nil, fmt.Errorf("state %q truncated: %d bytes of %d", name, len(b), size)
		}
		got[name] = statePayload{version: version, data: b[:size:size]}
		b = b[size:]
	}
	return got, nil
}
