//go:build unix

package graceful

import (
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The board's layout: slot 0 is the header (the canary's count of slots
// taken, then whether it ran out, then whether it mapped the board at
// all); slot i >= 1 is one connection: its socket's inode (the same in
// both processes), then its state. Native endianness: both processes run
// on one host.
const (
	boardSlots    = 1 << 16
	boardSlotSize = 16
	boardSize     = boardSlots * boardSlotSize
)

// board is one probation's board, mapped shared.
type board struct {
	mem  []byte
	file *os.File // the old process's, to send
}

func (b *board) u32(off int) *atomic.Uint32 {
	return (*atomic.Uint32)(unsafe.Pointer(&b.mem[off]))
}

func (b *board) u64(off int) *atomic.Uint64 {
	return (*atomic.Uint64)(unsafe.Pointer(&b.mem[off]))
}

// Header words.
func (b *board) taken() *atomic.Uint32    { return b.u32(0) }
func (b *board) overflow() *atomic.Uint32 { return b.u32(4) }
func (b *board) mapped() *atomic.Uint32   { return b.u32(8) }

// newBoard makes a board, in the old process.
func newBoard() (*board, error) {
	f, err := memFile("graceful-board") // a memfd on Linux, an unlinked file elsewhere
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(boardSize); err != nil {
		f.Close()
		return nil, err
	}
	b, err := mapBoard(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	b.file = f
	return b, nil
}

// mapBoard maps the board's file f, shared.
func mapBoard(f *os.File) (*board, error) {
	if fi, err := f.Stat(); err != nil || fi.Size() != boardSize {
		return nil, fmt.Errorf("probation board: not a board (%v)", err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, boardSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("probation board: %w", err)
	}
	return &board{mem: mem}, nil
}

func (b *board) close() {
	if b == nil {
		return
	}
	unix.Munmap(b.mem)
	if b.file != nil {
		b.file.Close()
	}
}

// register gives c, just received from the old process, a slot, in the
// canary; c itself when the board is full or c has no descriptor.
func (b *board) register(c net.Conn) net.Conn {
	ino, ok := inodeOf(c)
	i := 0
	if ok {
		i = int(b.taken().Add(1))
	}
	if !ok || i >= boardSlots {
		// Unknown to the board: the old process rescues nothing it cannot
		// tell apart. A slot of its own still sends the FIN at Close.
		b.overflow().Store(1)
		return &slottedConn{Conn: c, slot: new(atomic.Uint32)}
	}
	b.u64(i * boardSlotSize).Store(ino)
	slot := b.u32(i*boardSlotSize + 8)
	slot.Store(slotIdle) // nothing read yet
	return &slottedConn{Conn: c, slot: slot}
}

// states returns the state of every registered connection by inode, and
// whether the canary mapped the board and had room for every connection.
func (b *board) states() (map[uint64]uint32, bool) {
	n := min(int(b.taken().Load()), boardSlots-1)
	m := make(map[uint64]uint32, n)
	for i := 1; i <= n; i++ {
		if s := b.u32(i*boardSlotSize + 8).Load(); s != slotFree {
			m[b.u64(i*boardSlotSize).Load()] = s
		}
	}
	return m, b.mapped().Load() == 1 && b.overflow().Load() == 0
}

// inodeOf returns the inode of c's socket.
func inodeOf(c net.Conn) (uint64, bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var st unix.Stat_t
	var serr error = unix.EINVAL
	raw.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) })
	return st.Ino, serr == nil
}

// shutdownWrite sends c's FIN, whoever else holds its descriptor.
func shutdownWrite(c net.Conn) {
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_WR) })
		}
	}
}

// kept is the old process's duplicate of a descriptor it handed to the
// canary.
type kept struct {
	fd    int
	entry string // see handoffEntry
}

// keeper holds the old process's duplicates during one probation.
type keeper struct {
	b      *board
	mu     sync.Mutex
	m      map[uint64]kept // by inode
	closed bool            // stopped: sends keep no duplicate
	sends  sync.WaitGroup  // sends keeping a duplicate, in flight
}

func newKeeper() (*keeper, error) {
	b, err := newBoard()
	if err != nil {
		return nil, err
	}
	return &keeper{b: b, m: make(map[uint64]kept)}, nil
}

// send passes c to the canary with h, keeping a duplicate of its
// descriptor (none if that fails: then it cannot be rescued).
//
// Only while the canary has mapped the board, and has registered every
// connection so far: otherwise it sends no FIN for what it closes (an
// older version) and nothing could be rescued anyway. The duplicate is
// recorded before the descriptor is sent, so that whatever comes back
// (reclaimed, unread) finds it to forget.
func (k *keeper) send(h *handoff, key string, c net.Conn) error {
	entry := handoffEntry(key, c)
	k.mu.Lock()
	if k.closed || k.b.mapped().Load() != 1 || k.b.overflow().Load() != 0 {
		k.mu.Unlock()
		return h.sendEntry(entry, c)
	}
	k.sends.Add(1)
	k.mu.Unlock()
	defer k.sends.Done()
	dup, ino := -1, uint64(0)
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				var st unix.Stat_t
				if unix.Fstat(int(fd), &st) != nil {
					return
				}
				if d, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0); err == nil {
					dup, ino = d, st.Ino
				}
			})
		}
	}
	if dup >= 0 {
		k.mu.Lock()
		if old, ok := k.m[ino]; ok {
			unix.Close(old.fd) // an inode is reused only once its socket is gone
		}
		k.m[ino] = kept{dup, entry}
		k.mu.Unlock()
	}
	err := h.sendEntry(entry, c)
	if dup >= 0 && err != nil {
		k.mu.Lock()
		if d, ok := k.m[ino]; ok && d.fd == dup {
			unix.Close(dup)
			delete(k.m, ino)
		}
		k.mu.Unlock()
	}
	return err
}

// stop ends the keeping: sends from now on keep no duplicate, and those in
// flight have ended when it returns.
func (k *keeper) stop() {
	k.mu.Lock()
	k.closed = true
	k.mu.Unlock()
	k.sends.Wait()
}

// forget closes the duplicate of c's socket, if any: another descriptor of
// it has come back (reclaimed from the channel, unread).
func (k *keeper) forget(c net.Conn) {
	ino, ok := inodeOf(c)
	if !ok {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if d, ok := k.m[ino]; ok {
		unix.Close(d.fd)
		delete(k.m, ino)
	}
}

// prune closes the duplicates of connections the canary is done with.
// Only during the window (closeAll comes after).
func (k *keeper) prune() {
	states, _ := k.b.states()
	k.mu.Lock()
	defer k.mu.Unlock()
	for ino, s := range states {
		if d, ok := k.m[ino]; ok && s == slotGone {
			unix.Close(d.fd)
			delete(k.m, ino)
		}
	}
}

// rescue, once the canary is gone, serves with deliver the connections the
// board says it held idle or never registered, and closes the others'
// duplicates. It returns how many it served and closed.
func (k *keeper) rescue(deliver func(key string, c net.Conn)) (served, lost int) {
	states, whole := k.b.states()
	k.mu.Lock()
	m := k.m
	k.m = map[uint64]kept{}
	k.mu.Unlock()
	for ino, d := range m {
		s, registered := states[ino]
		if s == slotIdle || (!registered && whole) {
			key, c, err := receivedConn(d.fd, d.entry)
			if err == nil {
				deliver(key, c)
				served++
				continue
			}
		} else {
			unix.Close(d.fd)
		}
		if s == slotBusy {
			lost++
		}
	}
	return served, lost
}

// closeAll closes every duplicate and the board: the canary was promoted,
// or was never started.
func (k *keeper) closeAll() {
	if k == nil {
		return
	}
	k.stop()
	k.mu.Lock()
	for _, d := range k.m {
		unix.Close(d.fd)
	}
	k.m = map[uint64]kept{}
	b := k.b
	k.b = nil
	k.mu.Unlock()
	b.close()
}

// pruneEvery prunes until stop closes.
func (k *keeper) pruneEvery(d time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			k.prune()
		case <-stop:
			return
		}
	}
}

// empty reports whether no duplicate is kept.
func (k *keeper) empty() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.m) == 0
}

// processGone waits, at most d, until process pid has exited and been
// reaped, and reports whether it has.
func processGone(pid int, d time.Duration) bool {
	// Reaped, not a zombie: a zombie leader's other threads may still
	// run. tableflip reaps its child as soon as it exits.
	for deadline := time.Now().Add(d); ; time.Sleep(time.Millisecond) {
		if unix.Kill(pid, 0) == unix.ESRCH {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// takeBoard maps, in a canary, the board its parent passed.
func (p *Process) takeBoard(f *os.File) {
	b, err := mapBoard(f)
	if err != nil {
		p.log.Warn("probation: no board; if this process dies, the connections it holds die with it", "err", err)
		return
	}
	b.mapped().Store(1)
	p.board.Store(b)
}
