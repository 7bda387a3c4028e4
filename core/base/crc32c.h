#ifndef TG_CRC32C_H
#define TG_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor
 * 0xFFFFFFFF), as iSCSI, ext4 and most write-ahead logs use: the check value
 * of "123456789" is 0xE3069283. Table-driven, slicing by 8 (portable C, no
 * SSE4.2 instruction).
 *
 * crc is the value returned for the bytes before (0 to start), so a message
 * may be fed in pieces: tg_crc32c(tg_crc32c(0, a, n), b, m) equals the CRC of
 * a followed by b. Pure function: any thread. */
uint32_t tg_crc32c(uint32_t crc, const void *data, size_t len);

#endif
